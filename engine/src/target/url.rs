//! Target URLs: where `ferryd --target` and `ferryctl restore --target`
//! point.
//!
//! - a plain path, or `file:///abs/path`: a folder on this host
//!   ([`super::LocalTarget`], the embedded default);
//! - `az://CONTAINER[/PREFIX]`: an Azure Blob container;
//! - `s3://BUCKET[/PREFIX]`: an S3 bucket (or any S3-compatible store).
//!
//! A URL never carries a secret: user info, a query or a fragment are
//! refused (credentials come from the environment or the target options,
//! see [`super::blob`]), so a URL can be printed, logged and shown by
//! `ferryctl` as it is. Prefix segments follow the object key rules
//! ([`super::check_key`]), so nothing in a URL can reach outside its prefix.

use std::fmt;
use std::path::PathBuf;
use std::str::FromStr;

use crate::error::{Error, Result};

/// A parsed target URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TargetUrl {
    /// A folder on this host.
    Local(PathBuf),
    /// An Azure Blob container, and the prefix under it (no leading or trailing `/`).
    Azure { container: String, prefix: Option<String> },
    /// An S3 bucket, and the prefix under it.
    S3 { bucket: String, prefix: Option<String> },
}

impl TargetUrl {
    /// The blob store part: (scheme, container or bucket, prefix); `None` for a folder.
    pub fn blob(&self) -> Option<(&'static str, &str, Option<&str>)> {
        match self {
            TargetUrl::Local(_) => None,
            TargetUrl::Azure { container, prefix } => Some(("az", container, prefix.as_deref())),
            TargetUrl::S3 { bucket, prefix } => Some(("s3", bucket, prefix.as_deref())),
        }
    }
}

fn bad(url: &str, why: impl fmt::Display) -> Error {
    Error::invalid("target URL", format!("{url:?}: {why}"))
}

impl FromStr for TargetUrl {
    type Err = Error;

    fn from_str(url: &str) -> Result<Self> {
        if url.is_empty() {
            return Err(bad(url, "empty"));
        }
        let Some((scheme, rest)) = url.split_once("://") else {
            return Ok(TargetUrl::Local(PathBuf::from(url)));
        };
        if scheme == "file" {
            if !rest.starts_with('/') {
                return Err(bad(url, "a file URL names a local absolute path: file:///path"));
            }
            return Ok(TargetUrl::Local(PathBuf::from(rest)));
        }
        if let Some(c) = rest.chars().find(|c| matches!(c, '@' | ':' | '?' | '#' | '%')) {
            // Not echoed: what follows may be a secret.
            return Err(Error::invalid(
                "target URL",
                format!(
                    "{scheme}://...: {c:?} is not allowed: put credentials in the environment or the target options, never in the URL"
                ),
            ));
        }
        let (name, prefix) = match rest.split_once('/') {
            Some((n, p)) => (n, p.trim_end_matches('/')),
            None => (rest, ""),
        };
        let prefix = if prefix.is_empty() {
            None
        } else {
            super::check_key(prefix).map_err(|_| {
                bad(url, "the prefix must be /-separated names of letters, digits, '.', '_' and '-', without . or ..")
            })?;
            Some(prefix.to_string())
        };
        match scheme {
            "az" => {
                check_container(name).map_err(|why| bad(url, why))?;
                Ok(TargetUrl::Azure { container: name.to_string(), prefix })
            }
            "s3" => {
                check_bucket(name).map_err(|why| bad(url, why))?;
                Ok(TargetUrl::S3 { bucket: name.to_string(), prefix })
            }
            other => Err(bad(url, format!("unknown scheme {other:?}: use a path, file://, az:// or s3://"))),
        }
    }
}

impl fmt::Display for TargetUrl {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetUrl::Local(p) => write!(f, "{}", p.display()),
            _ => {
                let (scheme, name, prefix) = self.blob().expect("a blob URL");
                write!(f, "{scheme}://{name}")?;
                match prefix {
                    Some(p) => write!(f, "/{p}"),
                    None => Ok(()),
                }
            }
        }
    }
}

/// Azure container names: 3 to 63 lowercase letters, digits and single
/// hyphens, starting and ending with a letter or digit.
fn check_container(name: &str) -> std::result::Result<(), String> {
    let ok = (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-')
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--");
    ok.then_some(()).ok_or_else(|| {
        format!("container {name:?}: 3 to 63 lowercase letters, digits and single hyphens, not at either end")
    })
}

/// S3 bucket names: 3 to 63 lowercase letters, digits, '.' and '-',
/// starting and ending with a letter or digit, no "..".
fn check_bucket(name: &str) -> std::result::Result<(), String> {
    let edge = |c: Option<char>| c.is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
    let ok = (3..=63).contains(&name.len())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-' || c == '.')
        && edge(name.chars().next())
        && edge(name.chars().last())
        && !name.contains("..");
    ok.then_some(()).ok_or_else(|| {
        format!("bucket {name:?}: 3 to 63 lowercase letters, digits, '.' and '-', a letter or digit at each end")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse_to_their_target_and_print_back() {
        let az = |c: &str, p: Option<&str>| TargetUrl::Azure { container: c.into(), prefix: p.map(Into::into) };
        let s3 = |b: &str, p: Option<&str>| TargetUrl::S3 { bucket: b.into(), prefix: p.map(Into::into) };
        let table: &[(&str, TargetUrl, &str)] = &[
            ("/srv/ferry", TargetUrl::Local("/srv/ferry".into()), "/srv/ferry"),
            ("relative/dir", TargetUrl::Local("relative/dir".into()), "relative/dir"),
            ("file:///srv/ferry", TargetUrl::Local("/srv/ferry".into()), "/srv/ferry"),
            ("az://replicas", az("replicas", None), "az://replicas"),
            ("az://replicas/", az("replicas", None), "az://replicas"),
            ("az://replicas/site-a/2026", az("replicas", Some("site-a/2026")), "az://replicas/site-a/2026"),
            ("s3://my.bucket-1", s3("my.bucket-1", None), "s3://my.bucket-1"),
            ("s3://bkt/ferry/", s3("bkt", Some("ferry")), "s3://bkt/ferry"),
        ];
        for (text, want, shown) in table {
            let got: TargetUrl = text.parse().unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(&got, want, "{text}");
            assert_eq!(got.to_string(), *shown, "{text}");
            assert_eq!(got.to_string().parse::<TargetUrl>().unwrap(), got, "{text} round trip");
        }
    }

    #[test]
    fn bad_urls_are_refused_naming_the_problem() {
        let table: &[(&str, &str)] = &[
            ("", "empty"),
            ("file://host/x", "absolute path"),
            ("gs://bucket", "unknown scheme"),
            ("az://ab", "container"),
            ("az://Upper", "container"),
            ("az://a--b", "container"),
            ("az://-abc", "container"),
            ("s3://x", "bucket"),
            ("s3://a..b", "bucket"),
            ("s3://.abc", "bucket"),
            ("s3://bkt/../x", "prefix"),
            ("s3://bkt/a//b", "prefix"),
            ("s3://bkt/a b", "prefix"),
            ("az://user:secret@acct/c", "credentials"),
            ("s3://AKIAKEY:secretkey/x", "credentials"),
            ("s3://bkt/p?X-Amz-Signature=1", "credentials"),
            ("az://c0ntainer/p#frag", "credentials"),
        ];
        for (text, says) in table {
            let e = text.parse::<TargetUrl>().unwrap_err();
            assert_eq!(e.class(), crate::ErrorClass::NonRecoverable, "{text}");
            assert!(e.to_string().contains(says), "{text}: {e}");
            assert!(!e.to_string().contains("secret") && !e.to_string().contains("Signature"), "echoed: {e}");
        }
    }
}
