//! Server-Sent Events framing (the `text/event-stream` format both providers
//! stream in): bytes in, `(event, data)` frames out, whatever the chunking.

/// Longest frame accepted; a provider frame is a few hundred bytes.
const FRAME_MAX_BYTES: usize = 1 << 20;

/// One dispatched event: its `event:` name (if any) and its joined `data:` lines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    pub event: Option<String>,
    pub data: String,
}

#[derive(Debug, Default)]
pub struct SseParser {
    buffer: Vec<u8>,
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
        self.buffer.extend_from_slice(chunk);
        let mut frames = Vec::new();
        while let Some((end, separator)) = frame_end(&self.buffer) {
            let raw: Vec<u8> = self.buffer.drain(..end + separator).take(end).collect();
            let text = String::from_utf8(raw).map_err(|_| SseError::NotUtf8)?;
            if let Some(frame) = parse_frame(&text) {
                frames.push(frame);
            }
        }
        if self.buffer.len() > FRAME_MAX_BYTES {
            return Err(SseError::TooLarge);
        }
        Ok(frames)
    }
}

/// Where the first complete frame ends, and the length of its blank-line separator.
fn frame_end(buffer: &[u8]) -> Option<(usize, usize)> {
    let mut i = 0;
    while i < buffer.len() {
        for separator in [&b"\r\n\r\n"[..], b"\n\n", b"\r\r"] {
            if buffer[i..].starts_with(separator) {
                return Some((i, separator.len()));
            }
        }
        i += 1;
    }
    None
}

fn parse_frame(text: &str) -> Option<Frame> {
    let mut event = None;
    let mut data: Vec<&str> = Vec::new();
    for line in text.split(['\n', '\r']) {
        if line.is_empty() || line.starts_with(':') {
            continue;
        }
        let (field, value) = match line.split_once(':') {
            Some((field, value)) => (field, value.strip_prefix(' ').unwrap_or(value)),
            None => (line, ""),
        };
        match field {
            "event" => event = Some(value.to_owned()),
            "data" => data.push(value),
            _ => {}
        }
    }
    (!data.is_empty()).then(|| Frame {
        event,
        data: data.join("\n"),
    })
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
    fn an_endless_frame_is_refused() {
        let mut parser = SseParser::default();
        let chunk = vec![b'x'; FRAME_MAX_BYTES + 1];
        assert_eq!(parser.push(&chunk), Err(SseError::TooLarge));
    }
}
