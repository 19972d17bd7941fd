//! Users: the operator's `keycard user` commands, run against the configured store.
//!
//! They use the same store, key layout, name rules and argon2id cost as the gateway, so a
//! user added here logs in there. Each returns the line to print on success, or a
//! [`UserError`] whose message says what went wrong; the binary turns that into an exit code.
//! A password is never an argument: the binary reads it from standard input.

use crate::auth::password::Passwords;
use crate::auth::store::{Store, StoreError, UserRecord};
use crate::config::{Config, StoreUrl, is_valid_role};

/// Why a `keycard user` command failed.
#[derive(Debug, thiserror::Error)]
pub enum UserError {
    /// The name is not one `/register` would accept.
    #[error("invalid username {0:?}: 1 to 64 characters of A-Z a-z 0-9 . _ @ -")]
    InvalidName(String),
    /// The password breaks the contract's rule.
    #[error("invalid password: 8 to 1024 bytes")]
    InvalidPassword,
    /// A role name breaks the rule.
    #[error("invalid role {0:?}: 1 to 64 characters of A-Z a-z 0-9 . _ : -")]
    InvalidRole(String),
    /// More roles than a token should carry.
    #[error("at most {MAX_ROLES} roles per user")]
    TooManyRoles,
    /// `add` for a name that is taken.
    #[error("user {0:?} already exists")]
    Exists(String),
    /// Any other command for a name that is not there.
    #[error("no user {0:?}")]
    Missing(String),
    /// `memory://` lives inside one running keycard; another process cannot reach it.
    #[error(
        "the store is memory:// (inside the running keycard): user commands need a redis:// store"
    )]
    MemoryStore,
    /// The store did not answer.
    #[error("store unavailable: {0}")]
    Store(#[from] StoreError),
    /// Hashing failed.
    #[error("cannot hash the password: {0}")]
    Hash(String),
}

/// The store and hasher a command works with, built from the config.
pub struct Users {
    store: Store,
    config: Config,
}

impl Users {
    /// Opens the configured store (Redis only).
    pub fn open(config: Config) -> Result<Users, UserError> {
        if config.store.url == StoreUrl::Memory {
            return Err(UserError::MemoryStore);
        }
        let store = Store::open(&config.store)?;
        Ok(Users { store, config })
    }

    /// `keycard user add NAME [--roles a,b]`.
    pub async fn add(
        &self,
        name: &str,
        password: &str,
        roles: &[String],
    ) -> Result<String, UserError> {
        let name = username(name)?;
        check_roles(roles)?;
        if !(8..=1024).contains(&password.len()) {
            return Err(UserError::InvalidPassword);
        }
        let passwords =
            Passwords::new(&self.config.passwords).map_err(|e| UserError::Hash(e.to_string()))?;
        let phc = passwords
            .hash(password)
            .await
            .map_err(|e| UserError::Hash(e.to_string()))?;
        let user = UserRecord {
            phc,
            roles: roles.to_vec(),
        };
        if !self.store.create_user(&name, &user).await? {
            return Err(UserError::Exists(name));
        }
        Ok(format!("added {name} (roles: {})", show(roles)))
    }

    /// `keycard user roles NAME ROLE...`: replaces the roles; tokens carry the new ones from
    /// the user's next login or refresh.
    pub async fn roles(&self, name: &str, roles: &[String]) -> Result<String, UserError> {
        let name = username(name)?;
        check_roles(roles)?;
        if !self.store.set_roles(&name, roles).await? {
            return Err(UserError::Missing(name));
        }
        Ok(format!("{name}: roles {}", show(roles)))
    }

    /// `keycard user delete NAME`: the user and every session of it.
    pub async fn delete(&self, name: &str) -> Result<String, UserError> {
        let name = username(name)?;
        if !self.store.delete_user(&name).await? {
            return Err(UserError::Missing(name));
        }
        self.store.end_all_sessions(&name).await?;
        Ok(format!("deleted {name} and ended its sessions"))
    }

    /// `keycard user revoke NAME`: every token issued to the user until now is refused.
    pub async fn revoke(&self, name: &str) -> Result<String, UserError> {
        let name = username(name)?;
        if self.store.get_user(&name).await?.is_none() {
            return Err(UserError::Missing(name));
        }
        self.store.end_all_sessions(&name).await?;
        Ok(format!("ended every session of {name}"))
    }

    /// `keycard user list`: one line per user, `name<TAB>roles`.
    pub async fn list(&self) -> Result<String, UserError> {
        let users = self.store.list_users().await?;
        Ok(users
            .iter()
            .map(|(name, roles)| format!("{name}\t{}\n", show(roles)))
            .collect())
    }
}

/// Lowercased, as `/register` stores it.
fn username(name: &str) -> Result<String, UserError> {
    if crate::auth::is_valid_username(name) {
        Ok(name.to_ascii_lowercase())
    } else {
        Err(UserError::InvalidName(name.to_owned()))
    }
}

/// The most roles a user may have: every token carries them all, and one that no longer
/// fits a header limit would lock the user out.
const MAX_ROLES: usize = 32;

fn check_roles(roles: &[String]) -> Result<(), UserError> {
    if roles.len() > MAX_ROLES {
        return Err(UserError::TooManyRoles);
    }
    match roles.iter().find(|r| !is_valid_role(r)) {
        Some(bad) => Err(UserError::InvalidRole(bad.clone())),
        None => Ok(()),
    }
}

/// Roles comma-separated; none is an empty string in `list` (a role may be named `-`).
fn show(roles: &[String]) -> String {
    roles.join(",")
}
