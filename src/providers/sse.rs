//! Server-Sent Events framing (the `text/event-stream` format both providers
//! stream in): bytes in, `(event, data)` frames out, whatever the chunking.
//!
//! A push parser rather than a stream adapter such as `eventsource-stream`:
//! the chat's loop reads the provider's body itself (it times each read and
//! drains what is ready when the client leaves) and hands the bytes here.

/// Longest frame accepted; a provider frame is a few hundred bytes.
const FRAME_MAX_BYTES: usize = 1 << 20;

/// One dispatched event: its `event:` name (if any) and its joined `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub event: Option<String>,
    pub data: String,
}

/// A line-at-a-time parser of the event-stream format: each byte is looked
/// at once, whatever the chunking (lines end with CRLF, LF or CR; a blank
/// line dispatches the event).
#[derive(Debug, Default)]
pub struct SseParser {
    /// The current line, until its terminator arrives.
    line: Vec<u8>,
    /// The last terminator was a CR: an LF right after it belongs to it.
    after_cr: bool,
    event: Option<String>,
    /// The `data:` lines so far, joined by `\n`; `None` before the first.
    data: Option<String>,
    /// Bytes of the event being read, for the size bound.
    event_bytes: usize,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SseError {
    #[error("an event of the stream is larger than {FRAME_MAX_BYTES} bytes")]
    TooLarge,
    #[error("an event of the stream is not UTF-8")]
    NotUtf8,
}

impl SseParser {
    /// Adds `chunk` and returns every frame it completed.
    pub fn push(&mut self, chunk: &[u8]) -> Result<Vec<Frame>, SseError> {
        let mut frames = Vec::new();
        let mut rest = chunk;
        while !rest.is_empty() {
            if std::mem::take(&mut self.after_cr) && rest[0] == b'\n' {
                rest = &rest[1..];
                continue;
            }
            let Some(end) = rest.iter().position(|&b| b == b'\n' || b == b'\r') else {
                self.grow(rest)?;
                break;
            };
            self.grow(&rest[..end])?;
            self.after_cr = rest[end] == b'\r';
            rest = &rest[end + 1..];
            let line = std::mem::take(&mut self.line);
            if let Some(frame) = self.finish_line(line)? {
                frames.push(frame);
            }
        }
        Ok(frames)
    }

    fn grow(&mut self, bytes: &[u8]) -> Result<(), SseError> {
        self.event_bytes += bytes.len();
        if self.event_bytes > FRAME_MAX_BYTES {
            return Err(SseError::TooLarge);
        }
        self.line.extend_from_slice(bytes);
        Ok(())
    }

    /// Applies one complete line; a blank one dispatches the event, if it has data.
    fn finish_line(&mut self, line: Vec<u8>) -> Result<Option<Frame>, SseError> {
        if line.is_empty() {
            self.event_bytes = 0;
            let event = self.event.take();
            return Ok(self.data.take().map(|data| Frame { event, data }));
        }
        let line = String::from_utf8(line).map_err(|_| SseError::NotUtf8)?;
        if line.starts_with(':') {
            return Ok(None);
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line.as_str(), ""),
        };
        match field {
            "event" => self.event = Some(value.to_owned()),
            "data" => match &mut self.data {
                Some(data) => {
                    data.push('\n');
                    data.push_str(value);
                }
                None => self.data = Some(value.to_owned()),
            },
            _ => {}
        }
        Ok(None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_across_chunks_are_reassembled() {
        let mut parser = SseParser::default();
        let stream = b"event: ping\ndata: {\"type\": \"ping\"}\n\n: comment\n\ndata: one\r\ndata: two\r\n\r\n";
        let mut frames = Vec::new();
        for chunk in stream.chunks(5) {
            frames.extend(parser.push(chunk).unwrap());
        }
        assert_eq!(
            frames,
            vec![
                Frame {
                    event: Some("ping".into()),
                    data: "{\"type\": \"ping\"}".into()
                },
                Frame {
                    event: None,
                    data: "one\ntwo".into()
                },
            ]
        );
    }

    #[test]
    fn an_unfinished_frame_waits_for_its_blank_line() {
        let mut parser = SseParser::default();
        assert!(parser.push(b"data: [DONE]\n").unwrap().is_empty());
        assert_eq!(parser.push(b"\n").unwrap()[0].data, "[DONE]");
    }

    #[test]
    fn every_line_ending_and_any_split_give_the_same_frames() {
        let stream = "event: a\r\ndata: é1\r\rdata: x\n\r\nevent: b\rdata: 2\n\n";
        let expected = vec![
            Frame {
                event: Some("a".into()),
                data: "é1".into(),
            },
            Frame {
                event: None,
                data: "x".into(),
            },
            Frame {
                event: Some("b".into()),
                data: "2".into(),
            },
        ];
        for size in 1..stream.len() {
            let mut parser = SseParser::default();
            let mut frames = Vec::new();
            for chunk in stream.as_bytes().chunks(size) {
                frames.extend(parser.push(chunk).unwrap());
            }
            assert_eq!(frames, expected, "chunks of {size} bytes");
        }
    }

    #[test]
    fn a_long_stream_of_small_frames_is_not_bounded_by_its_total_size() {
        let mut parser = SseParser::default();
        let mut count = 0;
        for _ in 0..(FRAME_MAX_BYTES / 8) {
            count += parser.push(b"data: 1\n\n").unwrap().len();
        }
        assert_eq!(count, FRAME_MAX_BYTES / 8);
    }

    #[test]
    fn an_endless_frame_is_refused() {
        let mut parser = SseParser::default();
        let chunk = vec![b'x'; FRAME_MAX_BYTES + 1];
        assert_eq!(parser.push(&chunk), Err(SseError::TooLarge));
    }
}
