//! Maps YAML paths (`services.payments.endpoints[1].weight`) to their line and column, so a
//! semantic error found after deserialization can still point at the source.
//!
//! Built from the parser's event stream: a small stack of "where am I" frames. Must not fail:
//! a document the parser rejects just yields a shorter index (serde reports the syntax error).

use std::collections::HashMap;

use serde_saphyr::granit_parser::{Event, Parser};

/// 1-based line and column.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

#[derive(Debug, Default)]
pub struct Index {
    positions: HashMap<String, Pos>,
}

enum Frame {
    Map { path: String, key: Option<String> },
    Seq { path: String, next: usize },
}

// === impl Index ===

impl Index {
    pub fn build(text: &str) -> Index {
        let mut index = Index::default();
        let mut stack: Vec<Frame> = Vec::new();
        for item in Parser::new_from_str(text) {
            let Ok((event, span)) = item else { break };
            let pos = Pos { line: span.start.line(), column: span.start.col() + 1 };
            match event {
                Event::Scalar(value, ..) => {
                    index.node(&mut stack, Some(&value), pos);
                }
                Event::Alias(_) => {
                    index.node(&mut stack, None, pos);
                }
                Event::MappingStart(..) => {
                    let path = index.node(&mut stack, None, pos).unwrap_or_default();
                    stack.push(Frame::Map { path, key: None });
                }
                Event::SequenceStart(..) => {
                    let path = index.node(&mut stack, None, pos).unwrap_or_default();
                    stack.push(Frame::Seq { path, next: 0 });
                }
                Event::MappingEnd | Event::SequenceEnd => {
                    stack.pop();
                }
                _ => {}
            }
        }
        index
    }

    /// Records a node; returns its path, or `None` when the node is a mapping key.
    fn node(&mut self, stack: &mut [Frame], scalar: Option<&str>, pos: Pos) -> Option<String> {
        let path = match stack.last_mut() {
            None => String::new(),
            Some(Frame::Map { path, key: key @ None }) => {
                // Complex (non-scalar) keys are rare in config; they get a placeholder name.
                let name = scalar.unwrap_or("?").to_string();
                // An entry is located at its key, so errors point at `weight:`, and an
                // unknown-field error (reported at the key) finds its path.
                self.positions.entry(join_key(path, &name)).or_insert(pos);
                *key = Some(name);
                return None;
            }
            Some(Frame::Map { path, key }) => join_key(path, &key.take().unwrap_or_default()),
            Some(Frame::Seq { path, next }) => {
                *next += 1;
                format!("{path}[{}]", *next - 1)
            }
        };
        self.positions.entry(path.clone()).or_insert(pos);
        Some(path)
    }

    /// True when the document has no keys at all (empty, only comments, `~` or `{}`).
    pub fn is_empty(&self) -> bool {
        self.positions.keys().all(String::is_empty)
    }

    /// Like `find`, but only when `path` or an ancestor other than the document itself is
    /// in the text: whether this text set the value.
    pub fn find_set(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        while !p.is_empty() {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            p = parent(p)?;
        }
        None
    }

    /// The position of `path`, or of its nearest ancestor that exists in the file.
    pub fn find(&self, path: &str) -> Option<Pos> {
        let mut p = path;
        loop {
            if let Some(pos) = self.positions.get(p) {
                return Some(*pos);
            }
            p = parent(p)?;
        }
    }
}

impl Index {
    /// The path of the node that starts nearest before `pos` on the same line: how a
    /// parser error (which knows only a position) gets its YAML path.
    pub fn path_at(&self, pos: Pos) -> Option<String> {
        self.positions
            .iter()
            .filter(|(_, p)| p.line == pos.line && p.column <= pos.column)
            .max_by_key(|(path, p)| (p.column, path.len()))
            .map(|(path, _)| path.clone())
    }
}

pub fn join_key(parent: &str, key: &str) -> String {
    if parent.is_empty() { key.to_string() } else { format!("{parent}.{key}") }
}

fn parent(path: &str) -> Option<&str> {
    if path.is_empty() {
        return None;
    }
    let cut = path.rfind(['.', '[']).unwrap_or(0);
    Some(&path[..cut])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_nested_paths_and_falls_back_to_parents() {
        let text = "a:\n  b:\n    - x: 1\n    - x: 2\n      y: [3, 4]\n";
        let index = Index::build(text);
        assert_eq!(index.find("a.b[1].x"), Some(Pos { line: 4, column: 7 }));
        assert_eq!(index.find("a.b[1].y[1]"), Some(Pos { line: 5, column: 14 }));
        assert_eq!(index.path_at(Pos { line: 5, column: 7 }).as_deref(), Some("a.b[1].y"));
        assert_eq!(index.find("a.b[1].missing"), Some(Pos { line: 4, column: 7 }));
        assert_eq!(index.find("zzz"), Some(Pos { line: 1, column: 1 }));
    }
}
