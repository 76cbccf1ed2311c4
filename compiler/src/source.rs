//! Source files and positions.
//!
//! Every AST node carries a [`Span`]: which file, which byte range, and the 1-based line and
//! column of its first character, so that a diagnostic found long after parsing still points at
//! the YAML the user wrote.

use std::path::{Path, PathBuf};
use std::sync::Arc;

/// Index of a file in a [`SourceMap`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Default)]
pub struct FileId(pub u32);

/// A place in a source file.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Default)]
pub struct Span {
    pub file: FileId,
    /// Byte offset of the first byte.
    pub start: u32,
    /// Byte offset one past the last byte.
    pub end: u32,
    /// 1-based line of `start`.
    pub line: u32,
    /// 1-based column (in characters) of `start`.
    pub column: u32,
}

impl Span {
    pub fn len(&self) -> usize {
        (self.end - self.start) as usize
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// The smallest span covering both (which must be in the same file).
    pub fn to(self, other: Span) -> Span {
        if other.start < self.start {
            return other.to(self);
        }
        Span {
            end: self.end.max(other.end),
            ..self
        }
    }
}

/// One loaded file.
#[derive(Debug, Clone)]
pub struct SourceFile {
    /// The path as the user named it (relative paths stay relative, for stable output).
    pub path: PathBuf,
    pub text: Arc<str>,
    line_starts: Vec<u32>,
    /// Whether the text is all ASCII: then a character is one byte, and offsets and columns
    /// follow from each other without decoding the line (most policy files and snapshots).
    ascii: bool,
}

impl SourceFile {
    pub fn new(path: impl Into<PathBuf>, text: impl Into<Arc<str>>) -> SourceFile {
        let text: Arc<str> = text.into();
        let mut line_starts = vec![0u32];
        for (i, b) in text.bytes().enumerate() {
            if b == b'\n' {
                line_starts.push(i as u32 + 1);
            }
        }
        let ascii = text.is_ascii();
        SourceFile {
            path: path.into(),
            text,
            line_starts,
            ascii,
        }
    }

    /// Byte offset of a 1-based line and 0-based character column, clamped to the text.
    pub fn offset_of(&self, line: usize, char_col: usize) -> usize {
        let Some(&start) = self.line_starts.get(line.saturating_sub(1)) else {
            return self.text.len();
        };
        let rest = &self.text[start as usize..];
        if self.ascii {
            return start as usize + char_col.min(rest.len());
        }
        let within = rest
            .char_indices()
            .nth(char_col)
            .map(|(i, _)| i)
            .unwrap_or(rest.len());
        start as usize + within
    }

    /// The nearest character boundary at or before `offset`.
    fn floor_char(&self, offset: usize) -> usize {
        let mut o = offset.min(self.text.len());
        while !self.text.is_char_boundary(o) {
            o -= 1;
        }
        o
    }

    /// The nearest character boundary at or after `offset`.
    fn ceil_char(&self, offset: usize) -> usize {
        let mut o = offset.min(self.text.len());
        while !self.text.is_char_boundary(o) {
            o += 1;
        }
        o
    }

    /// 1-based line and column of a byte offset (inside a character counts as its start).
    pub fn line_col(&self, offset: usize) -> (u32, u32) {
        self.line_col_near(offset, None)
    }

    /// [`Self::line_col`], trying first the 1-based line `hint` (where a parser's marker says
    /// the offset is): the line is the last whose start is at or before the offset, found by
    /// binary search only when the hint is not it.
    fn line_col_near(&self, offset: usize, hint: Option<usize>) -> (u32, u32) {
        let offset = self.floor_char(offset);
        let at = offset as u32;
        let on = |l: usize| {
            self.line_starts.get(l).is_some_and(|&s| s <= at)
                && self.line_starts.get(l + 1).is_none_or(|&next| at < next)
        };
        let line = match hint.map(|h| h.wrapping_sub(1)).filter(|&l| on(l)) {
            Some(l) => l,
            None => match self.line_starts.binary_search(&at) {
                Ok(i) => i,
                Err(i) => i - 1,
            },
        };
        let start = self.line_starts[line] as usize;
        let col = if self.ascii {
            offset - start
        } else {
            self.text[start..offset].chars().count()
        };
        (line as u32 + 1, col as u32 + 1)
    }

    /// A span over a byte range of this file, widened to whole characters so that every span
    /// can be sliced and rendered.
    pub fn span(&self, file: FileId, start: usize, end: usize) -> Span {
        self.span_near(file, start, end, None)
    }

    /// [`Self::span`], for a caller that knows the 1-based line `start` is probably on (the
    /// same span; the line is only looked up when the hint is wrong).
    pub fn span_near(&self, file: FileId, start: usize, end: usize, line: Option<usize>) -> Span {
        let start = self.floor_char(start);
        let end = self.ceil_char(end.max(start));
        let (line, column) = self.line_col_near(start, line);
        Span {
            file,
            start: start as u32,
            end: end as u32,
            line,
            column,
        }
    }
}

/// All files of one run.
#[derive(Debug, Clone, Default)]
pub struct SourceMap {
    files: Vec<SourceFile>,
}

impl SourceMap {
    pub fn new() -> SourceMap {
        SourceMap::default()
    }

    pub fn add(&mut self, path: impl Into<PathBuf>, text: impl Into<Arc<str>>) -> FileId {
        let id = FileId(self.files.len() as u32);
        self.files.push(SourceFile::new(path, text));
        id
    }

    pub fn get(&self, id: FileId) -> &SourceFile {
        &self.files[id.0 as usize]
    }

    pub fn path(&self, id: FileId) -> &Path {
        &self.get(id).path
    }

    pub fn files(&self) -> impl Iterator<Item = (FileId, &SourceFile)> {
        self.files
            .iter()
            .enumerate()
            .map(|(i, f)| (FileId(i as u32), f))
    }

    /// The source text a span covers.
    pub fn text(&self, span: Span) -> &str {
        let f = self.get(span.file);
        f.text
            .get(span.start as usize..span.end as usize)
            .unwrap_or("")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The ASCII shortcuts and the line hint give what counting characters and searching
    /// lines gives, for every offset, column and hint, right or wrong.
    #[test]
    fn shortcuts_agree_with_counting_characters() {
        let counted_line_col = |f: &SourceFile, offset: usize| {
            let mut o = offset.min(f.text.len());
            while !f.text.is_char_boundary(o) {
                o -= 1;
            }
            let line = f.text[..o].matches('\n').count();
            let start = f.text[..o].rfind('\n').map_or(0, |i| i + 1);
            (line as u32 + 1, f.text[start..o].chars().count() as u32 + 1)
        };
        let counted_offset = |f: &SourceFile, line: usize, col: usize| {
            let Some(&start) = f.line_starts.get(line.saturating_sub(1)) else {
                return f.text.len();
            };
            let rest = &f.text[start as usize..];
            start as usize + rest.char_indices().nth(col).map_or(rest.len(), |(i, _)| i)
        };
        for text in [
            "",
            "a",
            "ab: 1\n\ncd: [x, y]\n",
            "\n\n\nz",
            "é: 1\nab: \"ü\"\n",
        ] {
            let f = SourceFile::new("x", text);
            assert_eq!(f.ascii, text.is_ascii());
            for offset in 0..=text.len() + 1 {
                let want = counted_line_col(&f, offset);
                assert_eq!(f.line_col(offset), want, "{text:?} at {offset}");
                for hint in 0..6 {
                    assert_eq!(
                        f.line_col_near(offset, Some(hint)),
                        want,
                        "{text:?} {offset} {hint}"
                    );
                    let end = offset + 1;
                    assert_eq!(
                        f.span_near(FileId(0), offset, end, Some(hint)),
                        f.span(FileId(0), offset, end)
                    );
                }
            }
            for line in 0..6 {
                for col in 0..12 {
                    assert_eq!(f.offset_of(line, col), counted_offset(&f, line, col));
                }
            }
        }
    }

    #[test]
    fn line_col_round_trips_with_multibyte_text() {
        let f = SourceFile::new("x", "é: 1\nab: \"ü\"\n");
        let off = f.offset_of(2, 4);
        assert_eq!(&f.text[off..off + 1], "\"");
        assert_eq!(f.line_col(off), (2, 5));
        assert_eq!(f.line_col(0), (1, 1));
        // A one-byte span at a multi-byte character covers the whole character.
        let s = f.span(FileId(0), 0, 1);
        assert_eq!((s.start, s.end), (0, 2));
        assert_eq!(f.line_col(1), (1, 1));
    }
}
