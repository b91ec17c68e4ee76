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
            message: toml_message(e),
        }
    }
}

/// The deserializer's message on one line. Some syntax errors (a control
/// byte in a comment) come with no words at all; the line and key then
/// still need a reason next to them.
fn toml_message(e: &toml::de::Error) -> String {
    let message = e
        .message()
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if message.is_empty() {
        "invalid TOML syntax".to_string()
    } else {
        message
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

#[cfg(test)]
mod tests {
    use std::path::Path;

    use crate::config::Config;

    #[test]
    fn a_wordless_syntax_error_still_gets_a_message() {
        // Found by the config fuzz target: it had read "x.toml:2: a: ".
        let errors = Config::parse(Path::new("x.toml"), "[a]\n# b\u{10}\n").unwrap_err();
        assert_eq!(errors.0.len(), 1);
        let e = &errors.0[0];
        assert_eq!(
            (e.line, e.message.as_str()),
            (Some(2), "invalid TOML syntax")
        );
    }
}
