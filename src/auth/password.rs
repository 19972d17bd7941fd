//! Passwords: argon2id hashing off the async workers.
