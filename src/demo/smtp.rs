//! The demo's mail server: an SMTP stand-in (RFC 5321's plain session:
//! `EHLO`/`HELO`, `MAIL FROM`, `RCPT TO`, `DATA` with dot-unstuffing,
//! `RSET`, `NOOP`, `QUIT`) that keeps every message it accepts in memory,
//! for the demo's "Boîte mail" page and the tests. creditd reaches it with
//! its real SMTP client (lettre), as it reaches a real server.
//!
//! Hand-written: the maintained SMTP server crates are whole mail servers
//! (queues, storage, TLS, authentication); accepting a session and keeping
//! its message is a hundred lines. Messages are read with `mail-parser`.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use chrono::{DateTime, Utc};
use tokio::io::{AsyncBufReadExt, AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// A message larger than this is refused (552): bounded memory.
const MESSAGE_BYTES_MAX: usize = 1024 * 1024;
/// A command line longer than this ends the session.
const LINE_BYTES_MAX: usize = 4096;
/// Messages kept; the oldest go first.
const MESSAGES_MAX: usize = 1000;

/// One message the server accepted.
#[derive(Debug, Clone)]
pub struct Received {
    /// The envelope's `MAIL FROM`.
    pub from: String,
    /// The envelope's `RCPT TO`s.
    pub to: Vec<String>,
    /// The message as sent (headers and body, dot-unstuffed).
    pub raw: Vec<u8>,
    pub received_at: DateTime<Utc>,
}

impl Received {
    fn parsed(&self) -> Option<mail_parser::Message<'_>> {
        mail_parser::MessageParser::default().parse(&self.raw)
    }

    /// The decoded `Subject`.
    pub fn subject(&self) -> String {
        self.parsed()
            .and_then(|m| m.subject().map(str::to_owned))
            .unwrap_or_default()
    }

    /// The decoded plain-text part.
    pub fn text(&self) -> String {
        self.parsed()
            .and_then(|m| m.body_text(0).map(|text| text.into_owned()))
            .unwrap_or_default()
    }

    /// The decoded HTML part.
    pub fn html(&self) -> String {
        self.parsed()
            .and_then(|m| m.body_html(0).map(|html| html.into_owned()))
            .unwrap_or_default()
    }
}

/// What the server received, shared with whoever reads it.
#[derive(Debug, Clone, Default)]
pub struct Mailbox {
    messages: Arc<Mutex<Vec<Received>>>,
}

impl Mailbox {
    /// Every message kept, oldest first.
    pub fn messages(&self) -> Vec<Received> {
        self.messages
            .lock()
            .map(|messages| messages.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    fn keep(&self, message: Received) {
        let mut messages = self
            .messages
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if messages.len() >= MESSAGES_MAX {
            messages.remove(0);
        }
        messages.push(message);
    }
}

/// A running server; stopping it (or dropping it) closes its port and its
/// sessions, as a server going down does.
pub struct SmtpServer {
    address: SocketAddr,
    task: tokio::task::JoinHandle<()>,
}

impl SmtpServer {
    /// Serves on `address` (port 0 picks one), keeping messages in `mailbox`.
    pub async fn start(address: SocketAddr, mailbox: Mailbox) -> std::io::Result<SmtpServer> {
        let listener = TcpListener::bind(address).await?;
        let address = listener.local_addr()?;
        let task = tokio::spawn(accept(listener, mailbox));
        Ok(SmtpServer { address, task })
    }

    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// `smtp://127.0.0.1:<port>`: creditd's `email.smtp_url` for it.
    pub fn url(&self) -> String {
        format!("smtp://{}", self.address)
    }

    /// Closes the port and every session.
    pub fn stop(&self) {
        self.task.abort();
    }
}

impl Drop for SmtpServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn accept(listener: TcpListener, mailbox: Mailbox) {
    // Sessions live in the set: aborting this task ends them too.
    let mut sessions = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    sessions.spawn(session(stream, mailbox.clone()));
                }
                Err(error) => tracing::warn!(%error, "demo SMTP: accept failed"),
            },
            Some(_) = sessions.join_next(), if !sessions.is_empty() => {}
        }
    }
}

/// One SMTP session, until `QUIT` or the client leaves.
async fn session(stream: TcpStream, mailbox: Mailbox) {
    if let Err(error) = converse(stream, mailbox).await {
        tracing::debug!(%error, "demo SMTP: session ended");
    }
}

async fn converse(stream: TcpStream, mailbox: Mailbox) -> std::io::Result<()> {
    let (reader, mut writer) = stream.into_split();
    let mut reader = BufReader::new(reader);
    writer
        .write_all(b"220 creditd-demo ESMTP ready\r\n")
        .await?;
    let mut from = String::new();
    let mut to: Vec<String> = Vec::new();
    loop {
        let Some(line) = read_line(&mut reader, LINE_BYTES_MAX).await? else {
            return Ok(());
        };
        let line = String::from_utf8_lossy(&line).trim_end().to_owned();
        let verb = line
            .split([' ', ':'])
            .next()
            .unwrap_or_default()
            .to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" => b"250-creditd-demo\r\n250-8BITMIME\r\n250 SMTPUTF8\r\n",
            "HELO" => b"250 creditd-demo\r\n",
            "MAIL" => {
                from = address_of(&line);
                to.clear();
                b"250 OK\r\n"
            }
            "RCPT" if to.len() < 100 => {
                to.push(address_of(&line));
                b"250 OK\r\n"
            }
            "RCPT" => b"452 Too many recipients\r\n",
            "DATA" if to.is_empty() => b"503 RCPT first\r\n",
            "DATA" => {
                writer
                    .write_all(b"354 End data with <CR><LF>.<CR><LF>\r\n")
                    .await?;
                match read_data(&mut reader).await? {
                    Some(raw) => {
                        mailbox.keep(Received {
                            from: std::mem::take(&mut from),
                            to: std::mem::take(&mut to),
                            raw,
                            received_at: Utc::now(),
                        });
                        b"250 OK: queued\r\n"
                    }
                    None => b"552 Message too large\r\n",
                }
            }
            "RSET" => {
                from.clear();
                to.clear();
                b"250 OK\r\n"
            }
            "NOOP" => b"250 OK\r\n",
            "QUIT" => {
                writer.write_all(b"221 Bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 Command not implemented\r\n",
        };
        writer.write_all(reply).await?;
    }
}

/// The address between `<` and `>` of `MAIL FROM:<a>` or `RCPT TO:<a>`.
fn address_of(line: &str) -> String {
    let start = line.find('<').map_or(0, |i| i + 1);
    let end = line[start..].find('>').map_or(line.len(), |i| start + i);
    line[start..end].to_owned()
}

/// One line with its `\r\n`, at most `max` bytes; `None` at the end.
async fn read_line<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
    max: usize,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut line = Vec::new();
    let read = (&mut *reader)
        .take(u64::try_from(max).unwrap_or(u64::MAX))
        .read_until(b'\n', &mut line)
        .await?;
    if read == 0 {
        return Ok(None);
    }
    if !line.ends_with(b"\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidData,
            "line too long",
        ));
    }
    Ok(Some(line))
}

/// The message after `DATA`, up to the line `.`, dot-unstuffed; `None`
/// when it was larger than `MESSAGE_BYTES_MAX` (read to its end all the
/// same, so the session goes on).
async fn read_data<R: AsyncRead + Unpin>(
    reader: &mut BufReader<R>,
) -> std::io::Result<Option<Vec<u8>>> {
    let mut message = Vec::new();
    let mut too_large = false;
    loop {
        let Some(line) = read_line(reader, MESSAGE_BYTES_MAX).await? else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "the client left in DATA",
            ));
        };
        if line == b".\r\n" || line == b".\n" {
            return Ok((!too_large).then_some(message));
        }
        let line = line.strip_prefix(b".").unwrap_or(&line);
        if message.len() + line.len() > MESSAGE_BYTES_MAX {
            too_large = true;
        } else {
            message.extend_from_slice(line);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn envelope_addresses_are_read_between_angle_brackets() {
        assert_eq!(address_of("MAIL FROM:<a@b.example>"), "a@b.example");
        assert_eq!(
            address_of("RCPT TO:<léa@exemple.fr> NOTIFY=NEVER"),
            "léa@exemple.fr"
        );
    }
}
