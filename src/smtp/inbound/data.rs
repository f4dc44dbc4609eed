//! DATA: dot-unstuffing, end-of-data and limits (RFC 5321 §4.1.1.4, §4.5.2).

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum DataState {
    /// At the start of a line that follows a CRLF (or the DATA command).
    LineStart,
    /// Saw a leading dot.
    Dot,
    /// Saw `.` CR at a line start.
    DotCr,
    /// Inside a line.
    InLine,
    /// Saw a CR inside a line.
    Cr,
}

#[derive(Debug)]
pub(super) struct DataReceiver {
    pub(super) state: DataState,
    pub(super) body: Vec<u8>,
    /// Octets of content so far (after unstuffing, without our header).
    pub(super) size: usize,
    pub(super) limit: usize,
    /// Size of the buffer at most: our header plus `limit`.
    pub(super) cap: usize,
    pub(super) line_len: usize,
    pub(super) line_limit: usize,
    pub(super) too_big: bool,
    pub(super) line_too_long: bool,
}

impl DataReceiver {
    pub(super) fn new(header: Vec<u8>, limit: usize, line_limit: usize) -> DataReceiver {
        let cap = header.len().saturating_add(limit);
        DataReceiver {
            state: DataState::LineStart,
            body: header,
            size: 0,
            limit,
            cap,
            line_len: 0,
            line_limit,
            too_big: false,
            line_too_long: false,
        }
    }

    pub(super) fn emit(&mut self, bytes: &[u8]) {
        self.size = self.size.saturating_add(bytes.len());
        if self.too_big || self.line_too_long {
            return;
        }
        if self.size > self.limit {
            self.too_big = true;
            self.body = Vec::new();
            return;
        }
        let needed = self.body.len() + bytes.len();
        if needed > self.body.capacity() {
            // Grow geometrically, but never beyond header + limit.
            let target = (self.body.capacity() * 2)
                .max(needed)
                .min(self.cap)
                .max(needed);
            self.body.reserve_exact(target - self.body.len());
        }
        self.body.extend_from_slice(bytes);
    }

    pub(super) fn content(&mut self, bytes: &[u8]) {
        self.line_len = self.line_len.saturating_add(bytes.len());
        if self.line_len > self.line_limit && !self.line_too_long {
            self.line_too_long = true;
            self.body = Vec::new();
        }
        self.emit(bytes);
    }

    pub(super) fn line_end(&mut self) {
        self.emit(b"\r\n");
        self.line_len = 0;
    }

    /// Consumes input; returns how much was used and whether CRLF.CRLF was seen (the
    /// rest of the input is then not touched).
    pub(super) fn ingest(&mut self, input: &[u8]) -> (usize, bool) {
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            match self.state {
                DataState::LineStart => {
                    if b == b'.' {
                        self.state = DataState::Dot;
                        i += 1;
                    } else {
                        self.state = DataState::InLine;
                    }
                }
                DataState::Dot => {
                    if b == b'\r' {
                        self.state = DataState::DotCr;
                        i += 1;
                    } else {
                        // A stuffed dot: drop it, the rest of the line is content.
                        self.state = DataState::InLine;
                    }
                }
                DataState::DotCr => {
                    if b == b'\n' {
                        return (i + 1, true);
                    }
                    // ".\r" + something else: the dot was stuffing, the CR is bare.
                    self.content(b"\r");
                    self.state = DataState::InLine;
                }
                DataState::InLine => {
                    let rest = &input[i..];
                    let n = rest
                        .iter()
                        .position(|&c| c == b'\r' || c == b'\n')
                        .unwrap_or(rest.len());
                    self.content(&rest[..n]);
                    i += n;
                    if let Some(&c) = input.get(i) {
                        i += 1;
                        if c == b'\r' {
                            self.state = DataState::Cr;
                        } else {
                            // Bare LF: normalised to CRLF, but it does not start a line
                            // for dot handling (no `\n.\r\n` smuggling).
                            self.line_end();
                        }
                    }
                }
                DataState::Cr => {
                    if b == b'\n' {
                        self.line_end();
                        self.state = DataState::LineStart;
                        i += 1;
                    } else {
                        // Bare CR, kept verbatim.
                        self.content(b"\r");
                        self.state = DataState::InLine;
                    }
                }
            }
        }
        (input.len(), false)
    }
}
