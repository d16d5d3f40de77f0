//! Key paths to byte spans of the manifest's TOML text (toml_edit keeps them on parse).

use std::ops::Range;

use toml_edit::{ImDocument, Item, Table, Value};

use super::Want;

#[derive(Clone, Copy)]
enum Node<'a> {
    Item(&'a Item),
    Value(&'a Value),
    /// A table inside an array of tables, which is not an `Item`.
    Table(&'a Table),
}

impl<'a> Node<'a> {
    fn child(&self, seg: &str) -> Option<(Option<Range<usize>>, Node<'a>)> {
        let keyed = |(k, v): (&'a toml_edit::Key, &'a Item)| (k.span(), Node::Item(v));
        let index = seg.parse::<usize>().ok();
        match *self {
            Node::Item(Item::Table(t)) | Node::Table(t) => t.get_key_value(seg).map(keyed),
            Node::Item(Item::ArrayOfTables(a)) => index.and_then(|i| a.get(i)).map(|t| (t.span(), Node::Table(t))),
            Node::Item(Item::Value(v)) | Node::Value(v) => match v {
                Value::InlineTable(t) => t.get_key_value(seg).map(keyed),
                Value::Array(a) => index.and_then(|i| a.get(i)).map(|v| (v.span(), Node::Value(v))),
                _ => None,
            },
            Node::Item(Item::None) => None,
        }
    }

    fn span(&self) -> Option<Range<usize>> {
        match *self {
            Node::Item(Item::Table(t)) | Node::Table(t) => t.span(),
            Node::Item(Item::Value(v)) | Node::Value(v) => v.span(),
            Node::Item(Item::ArrayOfTables(a)) => a.span(),
            Node::Item(Item::None) => None,
        }
    }
}

/// The span of the key or value at `path`, falling back to the nearest located ancestor.
pub(crate) fn span_of(doc: &ImDocument<String>, path: &[String], want: Want) -> Option<Range<usize>> {
    let mut node = Node::Item(doc.as_item());
    let mut best: Option<Range<usize>> = None;
    for (i, seg) in path.iter().enumerate() {
        let Some((key_span, child)) = node.child(seg) else { break };
        let last = i + 1 == path.len();
        let here = if last && want == Want::Value { child.span().or(key_span) } else { key_span.or_else(|| child.span()) };
        if here.is_some() {
            best = here;
        }
        node = child;
    }
    best
}
