//! Maps between key paths (`pools.blue.backends[1].weight`) and positions in
//! the TOML source, so every configuration error can name both.

use std::fmt;
use std::ops::Range;

use toml_edit::{Array, ArrayOfTables, ImDocument, Item, Table, TableLike, Value};

/// One step of a key path: a table key or an array index.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Seg {
    Key(String),
    Index(usize),
}

/// A key path such as `pools.blue.backends[1].weight`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KeyPath(Vec<Seg>);

impl KeyPath {
    pub fn root() -> Self {
        Self::default()
    }

    /// This path extended by a table key.
    pub fn key(&self, key: &str) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Key(key.to_string()));
        Self(segs)
    }

    /// This path extended by an array index.
    pub fn index(&self, index: usize) -> Self {
        let mut segs = self.0.clone();
        segs.push(Seg::Index(index));
        Self(segs)
    }
}

impl fmt::Display for KeyPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, seg) in self.0.iter().enumerate() {
            match seg {
                Seg::Key(k) if i == 0 => write!(f, "{k}")?,
                Seg::Key(k) => write!(f, ".{k}")?,
                Seg::Index(n) => write!(f, "[{n}]")?,
            }
        }
        Ok(())
    }
}

/// The parsed source, kept to turn key paths and byte offsets into lines.
pub struct Source<'a> {
    text: &'a str,
    doc: Option<ImDocument<&'a str>>,
}

impl<'a> Source<'a> {
    pub fn new(text: &'a str) -> Self {
        Self {
            text,
            doc: ImDocument::parse(text).ok(),
        }
    }

    /// 1-based line of a byte offset.
    pub fn line_of(&self, offset: usize) -> usize {
        let end = offset.min(self.text.len());
        self.text.as_bytes()[..end]
            .iter()
            .filter(|b| **b == b'\n')
            .count()
            + 1
    }

    /// The line where the deepest existing prefix of `path` is written.
    pub fn line_of_path(&self, path: &KeyPath) -> Option<usize> {
        let doc = self.doc.as_ref()?;
        let mut node = Node::Item(doc.as_item());
        let mut best = None;
        for seg in &path.0 {
            let Some((span, next)) = node.child(seg) else {
                break;
            };
            best = span.or(best);
            node = next;
        }
        best.map(|s| self.line_of(s.start))
    }

    /// The key path of the deepest key or value whose text contains `offset`.
    pub fn path_at(&self, offset: usize) -> KeyPath {
        let mut path = KeyPath::root();
        match &self.doc {
            Some(doc) => {
                descend(Node::Item(doc.as_item()), offset, &mut path);
            }
            None => path = self.path_by_lines(offset),
        }
        path
    }

    /// For text that does not parse: the last `[section]` header before
    /// `offset`, plus the key written on `offset`'s line, if any.
    fn path_by_lines(&self, offset: usize) -> KeyPath {
        let end = offset.min(self.text.len());
        let line_start = self.text[..end].rfind('\n').map_or(0, |i| i + 1);
        let mut path = KeyPath::root();
        for line in self.text[..line_start].lines().map(str::trim) {
            let header = line
                .strip_prefix("[[")
                .and_then(|l| l.strip_suffix("]]"))
                .or_else(|| line.strip_prefix('[').and_then(|l| l.strip_suffix(']')));
            if let Some(header) = header {
                path = header
                    .split('.')
                    .fold(KeyPath::root(), |p, k| p.key(k.trim()));
            }
        }
        let line = self.text[line_start..].lines().next().unwrap_or("");
        match line.split_once('=') {
            Some((key, _)) if !key.trim().is_empty() && !key.contains('[') => path.key(key.trim()),
            _ => path,
        }
    }
}

/// A position in the document tree: tables hold `Item`s, arrays hold
/// `Value`s, and arrays of tables hold plain `Table`s.
#[derive(Clone, Copy)]
enum Node<'d> {
    Item(&'d Item),
    Value(&'d Value),
    Table(&'d Table),
}

impl<'d> Node<'d> {
    fn table_like(self) -> Option<&'d dyn TableLike> {
        match self {
            Node::Item(item) => item.as_table_like(),
            Node::Value(v) => v.as_inline_table().map(|t| t as &dyn TableLike),
            Node::Table(t) => Some(t as &dyn TableLike),
        }
    }

    fn array(self) -> Option<&'d Array> {
        match self {
            Node::Item(item) => item.as_array(),
            Node::Value(v) => v.as_array(),
            Node::Table(_) => None,
        }
    }

    fn tables(self) -> Option<&'d ArrayOfTables> {
        match self {
            Node::Item(item) => item.as_array_of_tables(),
            _ => None,
        }
    }

    /// The child at `seg`, with the span that best locates it: its key for
    /// table entries, the element itself for array entries.
    fn child(self, seg: &Seg) -> Option<(Option<Range<usize>>, Node<'d>)> {
        match seg {
            Seg::Key(k) => {
                let (key, item) = self.table_like()?.get_key_value(k)?;
                Some((key.span(), Node::Item(item)))
            }
            Seg::Index(i) => {
                if let Some(tables) = self.tables() {
                    let t = tables.get(*i)?;
                    return Some((t.span(), Node::Table(t)));
                }
                let v = self.array()?.get(*i)?;
                Some((v.span(), Node::Value(v)))
            }
        }
    }

    /// Every child as (segment, locating span, node).
    fn children(self) -> Vec<(Seg, Option<Range<usize>>, Node<'d>)> {
        let mut out = Vec::new();
        if let Some(t) = self.table_like() {
            for (k, _) in t.iter() {
                if let Some((key, item)) = t.get_key_value(k) {
                    out.push((Seg::Key(k.to_string()), key.span(), Node::Item(item)));
                }
            }
        }
        if let Some(tables) = self.tables() {
            for (i, t) in tables.iter().enumerate() {
                out.push((Seg::Index(i), t.span(), Node::Table(t)));
            }
        }
        if let Some(array) = self.array() {
            for (i, v) in array.iter().enumerate() {
                out.push((Seg::Index(i), v.span(), Node::Value(v)));
            }
        }
        out
    }

    fn span(self) -> Option<Range<usize>> {
        match self {
            Node::Item(item) => item.span(),
            Node::Value(v) => v.span(),
            Node::Table(t) => t.span(),
        }
    }

    /// `[table]` sections are not one contiguous run of text, so their
    /// span says nothing about their contents and they are always searched.
    fn is_section(self) -> bool {
        matches!(
            self,
            Node::Item(Item::Table(_) | Item::ArrayOfTables(_)) | Node::Table(_)
        )
    }
}

/// Extends `path` with the deepest child of `node` containing `offset`.
fn descend(node: Node<'_>, offset: usize, path: &mut KeyPath) -> bool {
    let contains = |span: Option<Range<usize>>| {
        span.is_some_and(|s| s.start <= offset && offset < s.end.max(s.start + 1))
    };
    for (seg, key_span, child) in node.children() {
        let hit = contains(key_span) || contains(child.span());
        if hit || child.is_section() {
            path.0.push(seg);
            if descend(child, offset, path) || hit {
                return true;
            }
            path.0.pop();
        }
    }
    false
}
