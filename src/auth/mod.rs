//! Auth: everything that decides who the caller is.
//!
//! - [`token`]: issuing and verifying JWTs. No I/O.
//! - [`password`]: argon2id hashing on the blocking pool.
//! - [`store`]: users and revocations (Redis or memory).
//! - [`endpoints`]: `/register`, `/login`, `/logout`, `/refresh`.

pub mod endpoints;
pub mod password;
pub mod store;
pub mod token;
