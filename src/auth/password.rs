//! Passwords: argon2id hashing and verification, off the async workers and bounded.
//!
//! This module owns the password hash format (PHC strings, argon2id v19 with the configured
//! cost), how many hashes may run at once, and the timing equalisation for unknown users.
//!
//! argon2 is deliberately expensive (tens of milliseconds of CPU and megabytes of memory per
//! call), so every call:
//! 1. takes one of `max_concurrent` slots, or queues for one behind at most `max_queue`
//!    others and for at most `queue_timeout`, failing with [`PasswordError::Busy`] (the caller
//!    answers 503 + `Retry-After`) instead of queueing without bound and letting a login flood
//!    eat memory and latency;
//! 2. runs on tokio's blocking pool, holding its slot until the hash is done.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{self, Output, ParamsString, PasswordHash, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use crate::config::PasswordConfig;

/// Why a password operation failed. Neither variant says anything about the password.
#[derive(Debug, thiserror::Error)]
pub enum PasswordError {
    /// No hashing slot within `queue_timeout`: overload, answered 503 so clients back off.
    #[error("password hashing is saturated")]
    Busy,
    /// Bad parameters, a corrupt stored hash, or a panicked hashing task: a server fault.
    #[error("password hashing failed: {0}")]
    Internal(String),
}

/// The configured argon2id hasher plus the limits around it. Build once; a clone shares the
/// slots and the queue (so a spawned login check stays under the same limits).
#[derive(Clone)]
pub struct Passwords {
    params: Params,
    permits: Arc<Semaphore>,
    queue_timeout: Duration,
    /// Calls currently waiting for a slot (shared by clones), and how many may.
    waiting: Arc<AtomicUsize>,
    max_queue: usize,
    /// Hash of a random password with the current parameters; verified against when the user
    /// does not exist, so "no such user" costs as much as "wrong password" and response time
    /// does not reveal which usernames are registered.
    dummy_phc: Arc<str>,
    /// argon2's working memory, kept between hashes.
    memory: Arc<Memory>,
}

impl std::fmt::Debug for Passwords {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Passwords")
            .field("memory_kib", &self.params.m_cost())
            .field("iterations", &self.params.t_cost())
            .field("parallelism", &self.params.p_cost())
            .field("available_permits", &self.permits.available_permits())
            .field("queue_timeout", &self.queue_timeout)
            .finish_non_exhaustive()
    }
}

impl Passwords {
    /// Validates the cost parameters and precomputes the dummy hash.
    ///
    /// Computing the dummy hash here (synchronously, once, at startup) costs one hash but
    /// means a bad `[passwords]` section fails at startup instead of on the first login.
    pub fn new(config: &PasswordConfig) -> Result<Passwords, PasswordError> {
        let params = Params::new(
            config.memory_kib,
            config.iterations,
            config.parallelism,
            None,
        )
        .map_err(|e| PasswordError::Internal(format!("invalid argon2 parameters: {e}")))?;
        if config.max_concurrent == 0 || config.max_concurrent > Semaphore::MAX_PERMITS {
            return Err(PasswordError::Internal(format!(
                "passwords.max_concurrent must be between 1 and {}",
                Semaphore::MAX_PERMITS
            )));
        }

        let mut random = [0u8; 32];
        getrandom::fill(&mut random)
            .map_err(|e| PasswordError::Internal(format!("random source failed: {e}")))?;
        let memory = Arc::new(Memory::default());
        let dummy_phc = hash_blocking(&memory, &params, &random)?;
        Memory::spawn_sweeper(&memory);

        Ok(Passwords {
            memory,
            params,
            permits: Arc::new(Semaphore::new(config.max_concurrent)),
            queue_timeout: config.queue_timeout,
            waiting: Arc::new(AtomicUsize::new(0)),
            max_queue: config.max_queue,
            dummy_phc: dummy_phc.into(),
        })
    }

    /// Hashes a new password into a PHC string (random salt, current parameters) for storage.
    pub async fn hash(&self, password: &str) -> Result<String, PasswordError> {
        let params = self.params.clone();
        let password = password.to_owned();
        let memory = Arc::clone(&self.memory);
        self.run_bounded(move || hash_blocking(&memory, &params, password.as_bytes()))
            .await
    }

    /// Checks `password` against a stored PHC string; `None` means the user does not exist.
    ///
    /// The parameters are read from the stored hash, so hashes made before a cost change keep
    /// verifying. For `None` the same work is spent on the dummy hash and the answer is always
    /// `false`. A stored hash that cannot be parsed is an error (logged), not a `false`: it
    /// means the store is corrupt, and the user should see a 500 rather than "bad password".
    pub async fn verify(&self, password: &str, phc: Option<&str>) -> Result<bool, PasswordError> {
        let known_user = phc.is_some();
        let phc: Arc<str> = match phc {
            Some(phc) => phc.into(),
            None => Arc::clone(&self.dummy_phc),
        };
        let password = password.to_owned();
        let memory = Arc::clone(&self.memory);
        let matched = self
            .run_bounded(move || verify_blocking(&memory, &phc, password.as_bytes()))
            .await?;
        Ok(known_user && matched)
    }

    /// Joins the bounded queue for a slot: refused at once when `max_queue` calls already
    /// wait, and after `queue_timeout` otherwise.
    async fn queue_for_permit(&self) -> Result<OwnedSemaphorePermit, PasswordError> {
        /// Leaves the queue however the wait ends, including the request being dropped
        /// mid-wait when its client disconnects.
        struct InQueue<'a>(&'a AtomicUsize);
        impl Drop for InQueue<'_> {
            fn drop(&mut self) {
                self.0.fetch_sub(1, Ordering::AcqRel);
            }
        }
        let _in_queue = InQueue(&self.waiting);
        if self.waiting.fetch_add(1, Ordering::AcqRel) >= self.max_queue {
            return Err(PasswordError::Busy);
        }
        let acquired = tokio::time::timeout(
            self.queue_timeout,
            Arc::clone(&self.permits).acquire_owned(),
        )
        .await;
        match acquired {
            Ok(Ok(permit)) => Ok(permit),
            Ok(Err(_closed)) => Err(PasswordError::Internal("hashing semaphore closed".into())),
            Err(_elapsed) => Err(PasswordError::Busy),
        }
    }

    /// Waits (bounded) for a hashing slot, then runs `work` on the blocking pool with the slot
    /// held until it finishes.
    async fn run_bounded<T, F>(&self, work: F) -> Result<T, PasswordError>
    where
        T: Send + 'static,
        F: FnOnce() -> Result<T, PasswordError> + Send + 'static,
    {
        let permit: OwnedSemaphorePermit = match Arc::clone(&self.permits).try_acquire_owned() {
            Ok(permit) => permit,
            Err(_) => self.queue_for_permit().await?,
        };

        // Why the blocking pool: one argon2 call is tens of milliseconds of pure CPU. Run on an
        // async worker it would stall every other task on that worker — including the proxied
        // requests and streaming bodies of unrelated users. The permit moves into the closure,
        // so it is released when the hash actually finishes, even if the awaiting request was
        // dropped (client went away) meanwhile; otherwise cancelled logins would let more
        // hashes run than `max_concurrent`.
        tokio::task::spawn_blocking(move || {
            let _permit = permit;
            work()
        })
        .await
        .map_err(|e| PasswordError::Internal(format!("hashing task failed: {e}")))?
    }
}

fn argon2id(params: Params) -> Argon2<'static> {
    Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
}

/// argon2's working memory (`memory_kib`, 19 MiB by default), kept from one hash to the
/// next. Allocating it afresh for every hash cost a new mapping and its page faults each time:
/// about a quarter of a login's time in `scripts/bench.sh`. At most `max_concurrent` buffers
/// exist (one per running hash); one unused for [`KEEP_MEMORY`] goes back to the OS, so an
/// idle gateway holds none.
#[derive(Default)]
struct Memory {
    free: Mutex<Vec<(Vec<Block>, Instant)>>,
}

/// How long an unused argon2 buffer is kept.
const KEEP_MEMORY: Duration = Duration::from_secs(10);

impl Memory {
    /// A buffer of exactly `blocks` blocks: a kept one, or a new one.
    fn take(&self, blocks: usize) -> Vec<Block> {
        let mut free = self.lock();
        // A cost change leaves buffers of the old size behind: drop those.
        free.retain(|(buffer, _)| buffer.len() == blocks);
        match free.pop() {
            Some((buffer, _)) => buffer,
            None => vec![Block::default(); blocks],
        }
    }

    fn give(&self, buffer: Vec<Block>) {
        self.lock().push((buffer, Instant::now()));
    }

    /// Drops buffers unused for [`KEEP_MEMORY`].
    fn sweep(&self) {
        self.lock().retain(|(_, at)| at.elapsed() < KEEP_MEMORY);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Vec<(Vec<Block>, Instant)>> {
        self.free
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Sweeps every half [`KEEP_MEMORY`] while the memory is in use (when there is a runtime).
    fn spawn_sweeper(memory: &Arc<Memory>) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let memory = Arc::downgrade(memory);
        runtime.spawn(async move {
            let mut every = tokio::time::interval(KEEP_MEMORY / 2);
            loop {
                every.tick().await;
                match memory.upgrade() {
                    Some(memory) => memory.sweep(),
                    None => return,
                }
            }
        });
    }
}

/// argon2 of `password` and `salt` into `out`, in kept working memory.
fn argon2_into(
    memory: &Memory,
    argon: &Argon2<'_>,
    password: &[u8],
    salt: &[u8],
    out: &mut [u8],
) -> Result<(), password_hash::Error> {
    let mut buffer = memory.take(argon.params().block_count());
    let hashed = argon.hash_password_into_with_memory(password, salt, out, &mut buffer[..]);
    memory.give(buffer);
    Ok(hashed?)
}

/// Hashes with a fresh random salt; runs synchronously (callers put it on the blocking pool).
fn hash_blocking(
    memory: &Memory,
    params: &Params,
    password: &[u8],
) -> Result<String, PasswordError> {
    let fail = |e: password_hash::Error| PasswordError::Internal(format!("hashing failed: {e}"));
    let salt = SaltString::generate(&mut OsRng);
    let argon = argon2id(params.clone());
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.as_salt().decode_b64(&mut salt_bytes).map_err(fail)?;
    let length = params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN);
    let output = Output::init_with(length, |out| {
        argon2_into(memory, &argon, password, salt_bytes, out)
    })
    .map_err(fail)?;
    let hash = PasswordHash {
        algorithm: Algorithm::Argon2id.ident(),
        version: Some(Version::V0x13.into()),
        params: ParamsString::try_from(params).map_err(fail)?,
        salt: Some(salt.as_salt()),
        hash: Some(output),
    };
    Ok(hash.to_string())
}

/// Verifies against a PHC string using the algorithm, version and parameters it carries (what
/// `PasswordVerifier::verify_password` does, in the kept memory); runs synchronously.
fn verify_blocking(memory: &Memory, phc: &str, password: &[u8]) -> Result<bool, PasswordError> {
    let parsed = PasswordHash::new(phc).map_err(|e| {
        // The parse error names what is wrong with the format, never the hash contents.
        tracing::error!(error = %e, "stored password hash cannot be parsed");
        PasswordError::Internal(format!("stored password hash is malformed: {e}"))
    })?;
    let unusable = |e: password_hash::Error| {
        tracing::error!(error = %e, "stored password hash cannot be verified");
        PasswordError::Internal(format!("stored password hash is unusable: {e}"))
    };
    let (Some(salt), Some(expected)) = (parsed.salt, parsed.hash) else {
        return Err(unusable(password_hash::Error::PhcStringField));
    };
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(unusable)?;
    let version = match parsed.version {
        Some(v) => Version::try_from(v).map_err(|e| unusable(e.into()))?,
        None => Version::default(),
    };
    let params = Params::try_from(&parsed).map_err(unusable)?;
    let argon = Argon2::new(algorithm, version, params);
    let mut salt_bytes = [0u8; 64];
    let salt_bytes = salt.decode_b64(&mut salt_bytes).map_err(unusable)?;
    let computed = Output::init_with(expected.len(), |out| {
        argon2_into(memory, &argon, password, salt_bytes, out)
    })
    .map_err(unusable)?;
    // `Output`'s equality is constant-time.
    Ok(computed == expected)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn config(max_concurrent: usize, queue_timeout: Duration) -> PasswordConfig {
        PasswordConfig {
            memory_kib: 64,
            iterations: 1,
            parallelism: 1,
            max_concurrent,
            queue_timeout,
            max_queue: 64,
        }
    }

    fn passwords() -> Passwords {
        Passwords::new(&config(2, Duration::from_secs(5))).unwrap()
    }

    #[tokio::test]
    async fn hash_then_verify() {
        let p = passwords();
        let phc = p.hash("correct horse").await.unwrap();
        assert!(phc.starts_with("$argon2id$v=19$m=64,t=1,p=1$"), "{phc}");
        assert!(p.verify("correct horse", Some(&phc)).await.unwrap());
        assert!(!p.verify("wrong horse", Some(&phc)).await.unwrap());
        // Random salt: the same password hashes differently.
        assert_ne!(phc, p.hash("correct horse").await.unwrap());
    }

    #[tokio::test]
    async fn unknown_user_is_false() {
        let p = passwords();
        assert!(!p.verify("anything", None).await.unwrap());
        assert!(!p.verify("", None).await.unwrap());
    }

    #[test]
    fn hashes_interoperate_with_the_argon2_crates_own_hasher_and_verifier() {
        use argon2::password_hash::{PasswordHasher, PasswordVerifier};
        let params = Params::new(64, 1, 1, None).unwrap();
        // Ours, checked by the crate's verifier; the crate's, checked by ours.
        let memory = Memory::default();
        let ours = hash_blocking(&memory, &params, b"pw-one").unwrap();
        let parsed = PasswordHash::new(&ours).unwrap();
        assert!(
            argon2id(params.clone())
                .verify_password(b"pw-one", &parsed)
                .is_ok()
        );
        assert!(
            argon2id(params.clone())
                .verify_password(b"pw-two", &parsed)
                .is_err()
        );
        let salt = SaltString::generate(&mut OsRng);
        let theirs = argon2id(Params::new(128, 2, 1, None).unwrap())
            .hash_password(b"pw-one", &salt)
            .unwrap()
            .to_string();
        assert!(verify_blocking(&memory, &theirs, b"pw-one").unwrap());
        assert!(!verify_blocking(&memory, &theirs, b"pw-two").unwrap());
        // The kept memory follows each hash's own cost, down as well as up.
        assert!(verify_blocking(&memory, &ours, b"pw-one").unwrap());
        assert!(verify_blocking(&memory, &theirs, b"pw-one").unwrap());
        assert_eq!(memory.lock().len(), 1, "one buffer, of the last size");
        memory.lock()[0].1 -= KEEP_MEMORY;
        memory.sweep();
        assert!(memory.lock().is_empty(), "an unused buffer goes");
    }

    #[tokio::test]
    async fn hash_with_other_params_still_verifies() {
        let other = Passwords::new(&PasswordConfig {
            memory_kib: 128,
            iterations: 2,
            parallelism: 2,
            ..config(1, Duration::from_secs(5))
        })
        .unwrap();
        let phc = other.hash("hunter22").await.unwrap();
        assert!(phc.contains("m=128,t=2,p=2"), "{phc}");
        let p = passwords();
        assert!(p.verify("hunter22", Some(&phc)).await.unwrap());
        assert!(!p.verify("hunter23", Some(&phc)).await.unwrap());
    }

    #[tokio::test]
    async fn malformed_stored_hash_is_internal() {
        let p = passwords();
        for bad in ["", "not a hash", "$argon2id$v=19$m=64,t=1,p=1$!!!$???"] {
            assert!(
                matches!(
                    p.verify("pw", Some(bad)).await,
                    Err(PasswordError::Internal(_))
                ),
                "{bad:?}"
            );
        }
    }

    #[tokio::test]
    async fn busy_when_no_slot_frees_in_time() {
        let p = Passwords::new(&config(1, Duration::from_millis(10))).unwrap();
        let held = Arc::clone(&p.permits).acquire_owned().await.unwrap();
        assert!(matches!(p.hash("pw").await, Err(PasswordError::Busy)));
        assert!(matches!(
            p.verify("pw", None).await,
            Err(PasswordError::Busy)
        ));
        drop(held);
        // The slot is usable again, and released after each call.
        let phc = p.hash("pw").await.unwrap();
        assert!(p.verify("pw", Some(&phc)).await.unwrap());
        assert_eq!(p.permits.available_permits(), 1);
    }

    #[tokio::test]
    async fn full_queue_is_refused_at_once_and_a_dropped_waiter_leaves_it() {
        let mut cfg = config(1, Duration::from_secs(30));
        cfg.max_queue = 1;
        let p = Arc::new(Passwords::new(&cfg).unwrap());
        let held = Arc::clone(&p.permits).acquire_owned().await.unwrap();
        // One waiter fills the queue...
        let waiter = tokio::spawn({
            let p = Arc::clone(&p);
            async move { p.hash("pw").await }
        });
        while p.waiting.load(Ordering::Acquire) == 0 {
            tokio::task::yield_now().await;
        }
        // ...so the next call is refused without waiting 30 s.
        let started = std::time::Instant::now();
        assert!(matches!(p.hash("pw").await, Err(PasswordError::Busy)));
        assert!(started.elapsed() < Duration::from_secs(5));
        // A waiter that goes away (client disconnected) frees its queue place.
        waiter.abort();
        let _ = waiter.await;
        assert_eq!(p.waiting.load(Ordering::Acquire), 0);
        drop(held);
        assert!(p.hash("pw").await.is_ok());
    }

    #[test]
    fn bad_config_is_rejected() {
        assert!(Passwords::new(&config(0, Duration::from_secs(1))).is_err());
        let bad = PasswordConfig {
            memory_kib: 1,
            ..config(1, Duration::from_secs(1))
        };
        assert!(matches!(
            Passwords::new(&bad),
            Err(PasswordError::Internal(_))
        ));
    }
}
