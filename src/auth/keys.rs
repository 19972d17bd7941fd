//! Keys: the token signing key, the keys that still verify, and the JWKS that publishes them.
//!
//! Key material arrives from the config as bytes (an HMAC secret or a PEM file) and leaves as
//! `jsonwebtoken` keys, built once. PEM is read with the RustCrypto crates `jsonwebtoken`
//! itself uses, which also give the public parts for the JWKS (RFC 7517) without a private
//! key ever being serialised. Every key has a `kid`; the current key signs, the previous ones
//! only verify, so a rotation needs no forced logout and a key is retired by removing it.

use std::fmt;

use base64::Engine as _;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use jsonwebtoken::jwk::{
    AlgorithmParameters, CommonParameters, EllipticCurve, EllipticCurveKeyParameters,
    EllipticCurveKeyType, Jwk, JwkSet, KeyAlgorithm, OctetKeyPairParameters, OctetKeyPairType,
    PublicKeyUse, RSAKeyParameters, RSAKeyType,
};
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey};

/// The algorithms keycard signs and verifies with.
pub const ALGORITHMS: [Algorithm; 6] = [
    Algorithm::HS256,
    Algorithm::HS384,
    Algorithm::HS512,
    Algorithm::RS256,
    Algorithm::ES256,
    Algorithm::EdDSA,
];

/// The smallest RSA modulus accepted (NIST SP 800-57: 2048 bits until 2030).
const MIN_RSA_BITS: usize = 2048;

/// The smallest HMAC secret: shorter makes brute-forcing the signature realistic.
pub const MIN_SECRET_BYTES: usize = 32;

/// Where a key's material comes from.
#[derive(Clone, Copy)]
pub enum Material<'a> {
    /// An HMAC secret.
    Secret(&'a [u8]),
    /// A PEM private key (PKCS#8, or PKCS#1 for RSA, SEC1 for EC).
    PrivatePem(&'a [u8]),
    /// A PEM public key (SPKI, or PKCS#1 for RSA).
    PublicPem(&'a [u8]),
}

/// One verification key: its id, its algorithm, and its public JWK (none for HMAC).
#[derive(Clone)]
pub struct VerifyingKey {
    /// The `kid` tokens carry in their header.
    pub kid: String,
    /// The only algorithm this key is accepted with.
    pub algorithm: Algorithm,
    /// For `jsonwebtoken::decode`.
    pub decoding: DecodingKey,
    /// The public key as a JWK, published at `/.well-known/jwks.json`; `None` for HMAC keys,
    /// which are secret.
    pub jwk: Option<Jwk>,
}

/// Never prints key material.
impl fmt::Debug for VerifyingKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("VerifyingKey")
            .field("kid", &self.kid)
            .field("algorithm", &self.algorithm)
            .finish_non_exhaustive()
    }
}

/// Builds the verification key for `material`, and the signing key when the material is
/// private. Errors are short messages for the config error of the key that holds it; they
/// never contain key material.
pub fn load(
    kid: &str,
    algorithm: Algorithm,
    material: Material<'_>,
) -> Result<(VerifyingKey, Option<EncodingKey>), String> {
    let (decoding, encoding, params) = match (algorithm, material) {
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, Material::Secret(secret)) => {
            if secret.len() < MIN_SECRET_BYTES {
                return Err(format!(
                    "secret is {} bytes; HS* needs at least {MIN_SECRET_BYTES} (generate one with `openssl rand -base64 48`)",
                    secret.len()
                ));
            }
            let encoding = Some(EncodingKey::from_secret(secret));
            (DecodingKey::from_secret(secret), encoding, None)
        }
        (Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512, _) => {
            return Err(format!("{algorithm:?} needs a secret, not a key file"));
        }
        (_, Material::Secret(_)) => {
            return Err(format!("{algorithm:?} needs a PEM key file, not a secret"));
        }
        (Algorithm::RS256, material) => rsa_key(material)?,
        (Algorithm::ES256, material) => ec_key(material)?,
        (Algorithm::EdDSA, material) => ed_key(material)?,
        (other, _) => return Err(format!("unsupported algorithm {other:?}")),
    };
    let jwk = params.map(|algorithm_params| Jwk {
        common: CommonParameters {
            public_key_use: Some(PublicKeyUse::Signature),
            key_algorithm: Some(match algorithm {
                Algorithm::RS256 => KeyAlgorithm::RS256,
                Algorithm::ES256 => KeyAlgorithm::ES256,
                _ => KeyAlgorithm::EdDSA,
            }),
            key_id: Some(kid.to_owned()),
            ..CommonParameters::default()
        },
        algorithm: algorithm_params,
    });
    let key = VerifyingKey {
        kid: kid.to_owned(),
        algorithm,
        decoding,
        jwk,
    };
    Ok((key, encoding))
}

type Loaded = (
    DecodingKey,
    Option<EncodingKey>,
    Option<AlgorithmParameters>,
);

fn b64(bytes: &[u8]) -> String {
    URL_SAFE_NO_PAD.encode(bytes)
}

fn pem_str(pem: &[u8]) -> Result<&str, String> {
    std::str::from_utf8(pem).map_err(|_| "the key file is not PEM text".to_owned())
}

fn rsa_key(material: Material<'_>) -> Result<Loaded, String> {
    use rsa::pkcs1::{DecodeRsaPrivateKey, DecodeRsaPublicKey, EncodeRsaPrivateKey};
    use rsa::pkcs8::{DecodePrivateKey, DecodePublicKey};
    use rsa::traits::PublicKeyParts;
    let bad = "not an RSA key in PEM (PKCS#8 or PKCS#1)";
    let (public, encoding) = match material {
        Material::PrivatePem(pem) => {
            let pem = pem_str(pem)?;
            let private = rsa::RsaPrivateKey::from_pkcs8_pem(pem)
                .or_else(|_| rsa::RsaPrivateKey::from_pkcs1_pem(pem))
                .map_err(|_| bad.to_owned())?;
            let der = private
                .to_pkcs1_der()
                .map_err(|_| "cannot encode the RSA key")?;
            (
                private.to_public_key(),
                Some(EncodingKey::from_rsa_der(der.as_bytes())),
            )
        }
        Material::PublicPem(pem) => {
            let pem = pem_str(pem)?;
            let public = rsa::RsaPublicKey::from_public_key_pem(pem)
                .or_else(|_| rsa::RsaPublicKey::from_pkcs1_pem(pem))
                .map_err(|_| bad.to_owned())?;
            (public, None)
        }
        Material::Secret(_) => unreachable!("handled by load"),
    };
    if public.size() * 8 < MIN_RSA_BITS {
        return Err(format!(
            "RSA key is {} bits; at least {MIN_RSA_BITS} are required",
            public.size() * 8
        ));
    }
    let (n, e) = (public.n().to_bytes_be(), public.e().to_bytes_be());
    let params = AlgorithmParameters::RSA(RSAKeyParameters {
        key_type: RSAKeyType::RSA,
        n: b64(&n),
        e: b64(&e),
    });
    Ok((
        DecodingKey::from_rsa_raw_components(&n, &e),
        encoding,
        Some(params),
    ))
}

fn ec_key(material: Material<'_>) -> Result<Loaded, String> {
    use p256::elliptic_curve::sec1::ToEncodedPoint;
    use p256::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey};
    let bad = "not a P-256 (ES256) key in PEM (PKCS#8 or SEC1)";
    let (public, encoding) = match material {
        Material::PrivatePem(pem) => {
            let pem = pem_str(pem)?;
            let private = p256::SecretKey::from_pkcs8_pem(pem)
                .or_else(|_| p256::SecretKey::from_sec1_pem(pem))
                .map_err(|_| bad.to_owned())?;
            let der = private
                .to_pkcs8_der()
                .map_err(|_| "cannot encode the EC key")?;
            (
                private.public_key(),
                Some(EncodingKey::from_ec_der(der.as_bytes())),
            )
        }
        Material::PublicPem(pem) => {
            let public =
                p256::PublicKey::from_public_key_pem(pem_str(pem)?).map_err(|_| bad.to_owned())?;
            (public, None)
        }
        Material::Secret(_) => unreachable!("handled by load"),
    };
    let point = public.to_encoded_point(false);
    let (Some(x), Some(y)) = (point.x(), point.y()) else {
        return Err("the EC public key is the identity point".to_owned());
    };
    let (x, y) = (b64(x), b64(y));
    let decoding = DecodingKey::from_ec_components(&x, &y).map_err(|e| e.to_string())?;
    let params = AlgorithmParameters::EllipticCurve(EllipticCurveKeyParameters {
        key_type: EllipticCurveKeyType::EC,
        curve: EllipticCurve::P256,
        x,
        y,
    });
    Ok((decoding, encoding, Some(params)))
}

fn ed_key(material: Material<'_>) -> Result<Loaded, String> {
    use ed25519_dalek::pkcs8::{DecodePrivateKey, DecodePublicKey, EncodePrivateKey};
    let bad = "not an Ed25519 (EdDSA) key in PEM (PKCS#8)";
    let (public, encoding) = match material {
        Material::PrivatePem(pem) => {
            let private = ed25519_dalek::SigningKey::from_pkcs8_pem(pem_str(pem)?)
                .map_err(|_| bad.to_owned())?;
            let der = private
                .to_pkcs8_der()
                .map_err(|_| "cannot encode the Ed25519 key")?;
            (
                private.verifying_key(),
                Some(EncodingKey::from_ed_der(der.as_bytes())),
            )
        }
        Material::PublicPem(pem) => {
            let public = ed25519_dalek::VerifyingKey::from_public_key_pem(pem_str(pem)?)
                .map_err(|_| bad.to_owned())?;
            (public, None)
        }
        Material::Secret(_) => unreachable!("handled by load"),
    };
    let x = b64(public.as_bytes());
    let decoding = DecodingKey::from_ed_components(&x).map_err(|e| e.to_string())?;
    let params = AlgorithmParameters::OctetKeyPair(OctetKeyPairParameters {
        key_type: OctetKeyPairType::OctetKeyPair,
        curve: EllipticCurve::Ed25519,
        x,
    });
    Ok((decoding, encoding, Some(params)))
}

/// The JWKS document for `keys`: the public ones only (HMAC keys are secret), as the JSON
/// body of `GET /.well-known/jwks.json`.
pub fn jwks<'a>(keys: impl Iterator<Item = &'a VerifyingKey>) -> String {
    let set = JwkSet {
        keys: keys.filter_map(|k| k.jwk.clone()).collect(),
    };
    serde_json::to_string(&set).unwrap_or_else(|_| r#"{"keys":[]}"#.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!("{}/tests/keys/{name}", env!("CARGO_MANIFEST_DIR"))).unwrap()
    }

    #[test]
    fn each_algorithm_signs_and_its_public_half_verifies() {
        for (alg, private, public) in [
            (Algorithm::RS256, "rs256.pem", "rs256.pub.pem"),
            (Algorithm::ES256, "es256.pem", "es256.pub.pem"),
            (Algorithm::EdDSA, "ed25519.pem", "ed25519.pub.pem"),
        ] {
            let (_, signing) = load("k", alg, Material::PrivatePem(&fixture(private))).unwrap();
            let (verifying, none) = load("k", alg, Material::PublicPem(&fixture(public))).unwrap();
            assert!(none.is_none());
            let header = jsonwebtoken::Header::new(alg);
            let claims = serde_json::json!({"sub": "alice", "exp": 4_000_000_000u64});
            let token = jsonwebtoken::encode(&header, &claims, &signing.unwrap()).unwrap();
            let mut validation = jsonwebtoken::Validation::new(alg);
            validation.required_spec_claims.clear();
            jsonwebtoken::decode::<serde_json::Value>(&token, &verifying.decoding, &validation)
                .unwrap_or_else(|e| panic!("{alg:?}: {e}"));
            let jwks = jwks([&verifying].into_iter());
            assert!(jwks.contains("\"kid\":\"k\""), "{jwks}");
            assert!(!jwks.contains("\"d\""), "private part published: {jwks}");
        }
    }

    #[test]
    fn wrong_material_is_an_error_without_key_bytes() {
        let pem = fixture("es256.pem");
        let e = load("k", Algorithm::RS256, Material::PrivatePem(&pem)).unwrap_err();
        assert!(e.contains("RSA"), "{e}");
        assert!(!e.contains("BEGIN"), "{e}");
        let e = load("k", Algorithm::ES256, Material::Secret(b"x")).unwrap_err();
        assert!(e.contains("PEM"), "{e}");
        let e = load("k", Algorithm::HS256, Material::Secret(b"short")).unwrap_err();
        assert!(e.contains("at least 32"), "{e}");
        assert!(load("k", Algorithm::HS256, Material::PublicPem(&pem)).is_err());
        let (hs, _) = load("k", Algorithm::HS256, Material::Secret(&[7; 32])).unwrap();
        assert_eq!(
            jwks([&hs].into_iter()),
            r#"{"keys":[]}"#,
            "secrets never published"
        );
    }
}
