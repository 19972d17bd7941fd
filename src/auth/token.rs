//! Tokens: issuing and verifying JWTs.
