//! The line `ferryd` prints on stdout once every listener is bound, and its
//! parser: scripts and the test harness wait for it to learn where the
//! daemon listens (with `--listen 127.0.0.1:0` the port is only known then).
//!
//! ```text
//! ferryd ready: grpc=http://127.0.0.1:50551 nbd-socket=/var/lib/ferry/nbd.sock nbd-tcp=off data=/var/lib/ferry target=file:///var/lib/ferry/target
//! ```
//!
//! Fields are `key=value`, separated by spaces, in this order; a value that
//! is empty or holds whitespace, `"` or `\` is written as a JSON string, so
//! every path reads back as it was. A parser ignores keys it does not know,
//! so fields can be added. On a clean stop `ferryd` prints [`STOPPED`].

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::str::FromStr;

/// What the ready line starts with.
pub const PREFIX: &str = "ferryd ready: ";
/// The last line `ferryd` prints after a clean shutdown.
pub const STOPPED: &str = "ferryd stopped";

/// Where a running `ferryd` listens and keeps its data.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ready {
    /// The bound gRPC address (never port 0); see [`Ready::endpoint`].
    pub grpc: SocketAddr,
    /// The NBD Unix socket.
    pub nbd_socket: PathBuf,
    /// The NBD TCP address, `None` when NBD over TCP is off.
    pub nbd_tcp: Option<SocketAddr>,
    /// The state folder.
    pub data_dir: PathBuf,
    /// The target store, as the engine describes it.
    pub target: String,
}

impl Ready {
    /// The endpoint `ferryctl --endpoint` takes: `http://<grpc>`.
    pub fn endpoint(&self) -> String {
        format!("http://{}", self.grpc)
    }

    /// Finds and parses the ready line among `ferryd`'s stdout lines:
    /// `None` for any other line, `Some(Err)` for a ready line that does not parse.
    pub fn from_line(line: &str) -> Option<Result<Ready, ParseReadyError>> {
        line.starts_with(PREFIX.trim_end()).then(|| line.parse())
    }
}

/// Writes `value`, as a JSON string if it would not read back bare.
fn write_value(f: &mut fmt::Formatter<'_>, value: &str) -> fmt::Result {
    let bare = !value.is_empty() && !value.chars().any(|c| c.is_whitespace() || c == '"' || c == '\\');
    if bare {
        f.write_str(value)
    } else {
        let quoted = serde_json::to_string(value).map_err(|_| fmt::Error)?;
        f.write_str(&quoted)
    }
}

impl fmt::Display for Ready {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let nbd_tcp = self.nbd_tcp.map_or_else(|| "off".to_string(), |a| a.to_string());
        let fields = [
            ("grpc", self.endpoint()),
            ("nbd-socket", self.nbd_socket.display().to_string()),
            ("nbd-tcp", nbd_tcp),
            ("data", self.data_dir.display().to_string()),
            ("target", self.target.clone()),
        ];
        f.write_str(PREFIX)?;
        for (i, (key, value)) in fields.iter().enumerate() {
            if i > 0 {
                f.write_str(" ")?;
            }
            write!(f, "{key}=")?;
            write_value(f, value)?;
        }
        Ok(())
    }
}

/// A ready line that does not say what it must; the message names the field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParseReadyError(String);

impl fmt::Display for ParseReadyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "bad ferryd ready line: {}", self.0)
    }
}

impl std::error::Error for ParseReadyError {}

/// Splits `key=value key="quoted value" ...` into pairs.
fn fields(mut rest: &str) -> Result<Vec<(&str, String)>, ParseReadyError> {
    let mut out = Vec::new();
    loop {
        rest = rest.trim_start();
        if rest.is_empty() {
            return Ok(out);
        }
        let eq = rest.find('=').ok_or_else(|| ParseReadyError(format!("{rest:?} is not key=value")))?;
        let key = &rest[..eq];
        if key.is_empty() || key.contains(char::is_whitespace) {
            return Err(ParseReadyError(format!("{rest:?} is not key=value")));
        }
        let after = &rest[eq + 1..];
        let (value, next) = if after.starts_with('"') {
            // The shortest prefix that is a whole JSON string.
            let mut stream = serde_json::Deserializer::from_str(after).into_iter::<String>();
            let value = match stream.next() {
                Some(Ok(v)) => v,
                _ => return Err(ParseReadyError(format!("{key}: unterminated quoted value"))),
            };
            (value, &after[stream.byte_offset()..])
        } else {
            let end = after.find(char::is_whitespace).unwrap_or(after.len());
            (after[..end].to_string(), &after[end..])
        };
        if !(next.is_empty() || next.starts_with(char::is_whitespace)) {
            return Err(ParseReadyError(format!("{key}: no space after its value")));
        }
        out.push((key, value));
        rest = next;
    }
}

impl FromStr for Ready {
    type Err = ParseReadyError;

    fn from_str(line: &str) -> Result<Ready, ParseReadyError> {
        let rest = line
            .strip_prefix(PREFIX)
            .ok_or_else(|| ParseReadyError(format!("{line:?} does not start with {PREFIX:?}")))?;
        let pairs = fields(rest)?;
        let get = |key: &str| -> Result<&str, ParseReadyError> {
            pairs
                .iter()
                .find(|(k, _)| *k == key)
                .map(|(_, v)| v.as_str())
                .ok_or_else(|| ParseReadyError(format!("no {key}= in {line:?}")))
        };
        let grpc = get("grpc")?;
        let grpc = grpc
            .strip_prefix("http://")
            .and_then(|a| a.parse::<SocketAddr>().ok())
            .ok_or_else(|| ParseReadyError(format!("grpc={grpc:?} is not http://ADDRESS:PORT")))?;
        let nbd_tcp = match get("nbd-tcp")? {
            "off" => None,
            a => Some(a.parse().map_err(|_| ParseReadyError(format!("nbd-tcp={a:?} is neither off nor an address")))?),
        };
        Ok(Ready {
            grpc,
            nbd_socket: PathBuf::from(get("nbd-socket")?),
            nbd_tcp,
            data_dir: PathBuf::from(get("data")?),
            target: get("target")?.to_string(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Ready {
        Ready {
            grpc: "127.0.0.1:50551".parse().unwrap(),
            nbd_socket: "/var/lib/ferry/nbd.sock".into(),
            nbd_tcp: None,
            data_dir: "/var/lib/ferry".into(),
            target: "file:///var/lib/ferry/target".into(),
        }
    }

    #[test]
    fn the_line_reads_as_documented() {
        assert_eq!(
            sample().to_string(),
            "ferryd ready: grpc=http://127.0.0.1:50551 nbd-socket=/var/lib/ferry/nbd.sock nbd-tcp=off \
             data=/var/lib/ferry target=file:///var/lib/ferry/target"
        );
        assert_eq!(sample().endpoint(), "http://127.0.0.1:50551");
    }

    #[test]
    fn every_value_round_trips_including_awkward_paths() {
        let cases = [
            sample(),
            Ready { nbd_tcp: Some("127.0.0.1:10809".parse().unwrap()), ..sample() },
            Ready { grpc: "[::1]:7".parse().unwrap(), ..sample() },
            Ready { nbd_socket: "/tmp/my disks/nbd.sock".into(), ..sample() },
            Ready { data_dir: "/tmp/a\"b\\c\td".into(), ..sample() },
            Ready { data_dir: "/tmp/x nbd-tcp=1.2.3.4:5".into(), ..sample() },
            Ready { target: String::new(), ..sample() },
            Ready { target: "\"quoted\"".into(), ..sample() },
        ];
        for ready in cases {
            let line = ready.to_string();
            assert_eq!(line.parse::<Ready>().as_ref(), Ok(&ready), "{line}");
            assert_eq!(Ready::from_line(&line), Some(Ok(ready.clone())), "{line}");
        }
    }

    #[test]
    fn unknown_fields_are_ignored_and_other_lines_are_not_ready_lines() {
        let line = format!("{sample} pid=42 note=\"a b\"", sample = sample());
        assert_eq!(line.parse::<Ready>(), Ok(sample()));
        assert_eq!(Ready::from_line("2026-01-01 INFO starting"), None);
        assert_eq!(Ready::from_line(STOPPED), None);
    }

    #[test]
    fn a_broken_line_names_what_is_wrong() {
        let err = |line: &str| line.parse::<Ready>().unwrap_err().to_string();
        assert!(err("ferryd ready: nbd-socket=/s nbd-tcp=off data=/d target=t").contains("no grpc="));
        assert!(err("ferryd ready: grpc=127.0.0.1:1 nbd-socket=/s nbd-tcp=off data=/d target=t").contains("grpc="));
        assert!(
            err("ferryd ready: grpc=http://127.0.0.1:1 nbd-socket=/s nbd-tcp=on data=/d target=t").contains("nbd-tcp=")
        );
        assert!(err("ferryd ready: grpc=http://127.0.0.1:1 nbd-socket=\"/s nbd-tcp=off").contains("unterminated"));
        assert!(err("ferryd ready: grpc=http://127.0.0.1:1 nbd-socket=\"/s\"x").contains("no space"));
        assert!(err("ferryd ready: oops").contains("key=value"));
        assert!(Ready::from_line("ferryd ready:").is_some_and(|r| r.is_err()));
    }
}
