//! SMTP AUTH (PLAIN, over TLS only) for clients outside `server.allow`: users and their
//! Argon2id password hashes in a file (`server.auth_users_file`), one `user:hash` per
//! line; `#` starts a comment. Make a hash with `stsrelay auth hash` (password on stdin).

use super::inbound::{Authenticator, Credentials};
use argon2::Argon2;
use argon2::password_hash::{
    PasswordHash, PasswordHasher, PasswordVerifier, SaltString, rand_core::OsRng,
};
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The users file could not be used.
#[derive(Debug, thiserror::Error)]
pub enum AuthFileError {
    /// Unreadable.
    #[error("server.auth_users_file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// A line is not `user:argon2-hash`.
    #[error("server.auth_users_file {path} line {line}: {reason}")]
    Line {
        /// The file.
        path: PathBuf,
        /// 1-based line.
        line: usize,
        /// Why.
        reason: String,
    },
}

/// Users allowed to relay after AUTH.
#[derive(Clone, Default)]
pub struct UserFile {
    users: Arc<HashMap<String, String>>,
}

impl std::fmt::Debug for UserFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "UserFile({} users)", self.users.len())
    }
}

impl UserFile {
    /// Load and check every line (each hash must parse as a PHC string).
    pub fn load(path: &Path) -> Result<UserFile, AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        UserFile::parse(&text).map_err(|(line, reason)| AuthFileError::Line {
            path: path.to_path_buf(),
            line,
            reason,
        })
    }

    /// Parse the file's text; errors carry the line number.
    pub fn parse(text: &str) -> Result<UserFile, (usize, String)> {
        let mut users = HashMap::new();
        for (i, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (user, hash) = line
                .split_once(':')
                .ok_or((i + 1, "expected user:hash".to_string()))?;
            if user.is_empty() {
                return Err((i + 1, "empty user name".into()));
            }
            PasswordHash::new(hash).map_err(|e| (i + 1, format!("not a password hash: {e}")))?;
            users.insert(user.to_string(), hash.to_string());
        }
        Ok(UserFile {
            users: Arc::new(users),
        })
    }

    /// Users known.
    pub fn len(&self) -> usize {
        self.users.len()
    }

    /// No users?
    pub fn is_empty(&self) -> bool {
        self.users.is_empty()
    }
}

/// Argon2id PHC string for a password (what the users file holds).
///
/// ```
/// let h = stsrelay::smtp::auth::hash_password("s3cret").unwrap();
/// assert!(h.starts_with("$argon2id$"));
/// let users = stsrelay::smtp::auth::UserFile::parse(&format!("alice:{h}\n")).unwrap();
/// assert_eq!(users.len(), 1);
/// ```
pub fn hash_password(password: &str) -> Result<String, String> {
    let salt = SaltString::generate(&mut OsRng);
    Argon2::default()
        .hash_password(password.as_bytes(), &salt)
        .map(|h| h.to_string())
        .map_err(|e| e.to_string())
}

fn verify(hash: &str, password: &str) -> bool {
    PasswordHash::new(hash)
        .map(|h| {
            Argon2::default()
                .verify_password(password.as_bytes(), &h)
                .is_ok()
        })
        .unwrap_or(false)
}

#[async_trait::async_trait]
impl Authenticator for UserFile {
    async fn authenticate(&self, c: &Credentials) -> bool {
        let users = self.users.clone();
        let (user, password) = (c.username.clone(), c.password.clone());
        tokio::task::spawn_blocking(move || match users.get(&user) {
            Some(hash) => verify(hash, &password),
            None => false,
        })
        .await
        .unwrap_or(false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn verifies_known_users_only() {
        let h = hash_password("pw1").unwrap();
        let f = UserFile::parse(&format!("# users\nalice:{h}\n\n")).unwrap();
        let creds = |u: &str, p: &str| Credentials {
            authzid: String::new(),
            username: u.into(),
            password: p.into(),
        };
        assert!(f.authenticate(&creds("alice", "pw1")).await);
        assert!(!f.authenticate(&creds("alice", "pw2")).await);
        assert!(!f.authenticate(&creds("bob", "pw1")).await);
        assert_eq!(UserFile::parse("alice\n").unwrap_err().0, 1);
        assert_eq!(UserFile::parse("# c\nalice:plaintext\n").unwrap_err().0, 2);
    }
}
