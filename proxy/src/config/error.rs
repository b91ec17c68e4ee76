//! Configuration errors that name the file, the key path and the line.

use std::fmt;
use std::path::{Path, PathBuf};

use super::locate::{KeyPath, Source};

/// One problem found in a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    pub file: PathBuf,
    pub key: String,
    pub line: Option<usize>,
    pub message: String,
}

impl ConfigError {
    /// A problem with the file as a whole (missing, unreadable).
    pub fn file_level(file: &Path, message: String) -> Self {
        Self {
            file: file.to_path_buf(),
            key: String::new(),
            line: None,
            message,
        }
    }

    /// A parse or type error reported by the TOML deserializer.
    pub(super) fn from_toml(file: &Path, source: &Source<'_>, e: &toml::de::Error) -> Self {
        let (key, line) = match e.span() {
            Some(span) => (source.path_at(span.start), Some(source.line_of(span.start))),
            None => (KeyPath::root(), None),
        };
        Self {
            file: file.to_path_buf(),
            key: key.to_string(),
            line,
            message: e
                .message()
                .lines()
                .map(str::trim)
                .filter(|l| !l.is_empty())
                .collect::<Vec<_>>()
                .join("; "),
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if let Some(line) = self.line {
            write!(f, ":{line}")?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// A semantic problem found by validation, before it is located.
#[derive(Debug)]
pub(super) struct Problem {
    pub path: KeyPath,
    pub message: String,
}

/// All problems found in one file; never empty.
#[derive(Debug, Clone)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl ConfigErrors {
    pub fn single(e: ConfigError) -> Self {
        Self(vec![e])
    }

    pub(super) fn from_problems(file: &Path, source: &Source<'_>, problems: Vec<Problem>) -> Self {
        Self(
            problems
                .into_iter()
                .map(|p| ConfigError {
                    file: file.to_path_buf(),
                    line: source.line_of_path(&p.path),
                    key: p.path.to_string(),
                    message: p.message,
                })
                .collect(),
        )
    }
}

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

impl std::error::Error for ConfigErrors {}
