//! Raw argon2id verification rate, the ceiling for logins per second: `threads` OS threads
//! each verify one password against a PHC hash made with keycard's default cost
//! (`PasswordConfig::default()`), for `seconds`, and the total is printed as `N hashes/s`.
//! `benches/peers.py` compares keycard's logins per second with this on the same cores.
//!
//!     target/release/examples/hash_rate [THREADS] [SECONDS]

use std::time::{Duration, Instant};

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::{Algorithm, Argon2, Params, Version};
use keycard::config::PasswordConfig;

fn main() {
    let mut args = std::env::args().skip(1);
    let threads: usize = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(1)
        .clamp(1, 64);
    let seconds: u64 = args
        .next()
        .and_then(|a| a.parse().ok())
        .unwrap_or(10)
        .clamp(1, 120);
    let c = PasswordConfig::default();
    let params = Params::new(c.memory_kib, c.iterations, c.parallelism, None).expect("params");
    let argon = Argon2::new(Algorithm::Argon2id, Version::V0x13, params);
    let salt = SaltString::encode_b64(b"keycard-bench-salt").expect("salt");
    let phc = argon
        .hash_password(b"bench-password-1", &salt)
        .expect("hash")
        .to_string();
    let until = Instant::now() + Duration::from_secs(seconds);
    let start = Instant::now();
    let total: u64 = std::thread::scope(|s| {
        let workers: Vec<_> = (0..threads)
            .map(|_| {
                s.spawn(|| {
                    let parsed = PasswordHash::new(&phc).expect("phc");
                    let mut n = 0u64;
                    while Instant::now() < until {
                        argon
                            .verify_password(b"bench-password-1", &parsed)
                            .expect("verify");
                        n += 1;
                    }
                    n
                })
            })
            .collect();
        workers.into_iter().map(|w| w.join().unwrap_or(0)).sum()
    });
    let rate = total as f64 / start.elapsed().as_secs_f64();
    println!(
        "{rate:.1} hashes/s ({total} argon2id verifications, m={} KiB t={} p={}, {threads} thread(s))",
        c.memory_kib, c.iterations, c.parallelism
    );
}
