//! The catalogue in memory, and who may use what to personalise.

use std::collections::{HashMap, HashSet};

use crate::event::CatalogueItem;
use crate::model::{MatrixFactorization, PreferenceModel};

/// The items an app can recommend, indexed for ranking (topics interned to small ids).
#[derive(Clone, Debug, Default)]
pub struct Catalogue {
    items: Vec<CatalogueItem>,
    index: HashMap<String, usize>,
    topic_names: Vec<String>,
    topic_ids: HashMap<String, u32>,
    item_topics: Vec<Vec<u32>>,
}

impl Catalogue {
    /// A catalogue from its items (a later entry with the same id replaces an earlier one).
    pub fn new(items: Vec<CatalogueItem>) -> Self {
        let mut c = Self::default();
        for item in items {
            if let Some(&i) = c.index.get(&item.item) {
                c.item_topics[i] = c.intern(&item.topics);
                c.items[i] = item;
            } else {
                let topics = c.intern(&item.topics);
                c.index.insert(item.item.clone(), c.items.len());
                c.items.push(item);
                c.item_topics.push(topics);
            }
        }
        c
    }

    fn intern(&mut self, topics: &[String]) -> Vec<u32> {
        topics
            .iter()
            .map(|t| {
                *self.topic_ids.entry(t.clone()).or_insert_with(|| {
                    self.topic_names.push(t.clone());
                    (self.topic_names.len() - 1) as u32
                })
            })
            .collect()
    }

    /// The items.
    pub fn items(&self) -> &[CatalogueItem] {
        &self.items
    }

    /// The number of items.
    pub fn len(&self) -> usize {
        self.items.len()
    }

    /// Whether the catalogue is empty.
    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// The position of an item id.
    pub fn position(&self, item: &str) -> Option<usize> {
        self.index.get(item).copied()
    }

    /// The item at a position.
    pub fn get(&self, position: usize) -> &CatalogueItem {
        &self.items[position]
    }

    /// An item's topic ids.
    pub fn topic_ids(&self, position: usize) -> &[u32] {
        &self.item_topics[position]
    }

    /// The id of a topic name, if any item has it.
    pub fn topic_id(&self, topic: &str) -> Option<u32> {
        self.topic_ids.get(topic).copied()
    }

    /// The number of distinct topics.
    pub fn topic_count(&self) -> usize {
        self.topic_names.len()
    }

    /// A topic's name.
    pub fn topic_name(&self, id: u32) -> &str {
        &self.topic_names[id as usize]
    }

    /// A label for an item: its title, else its id.
    pub fn display_name(&self, position: usize) -> &str {
        let item = &self.items[position];
        item.title.as_deref().unwrap_or(&item.item)
    }

    /// Each item's row in `model`, by position.
    pub fn model_rows(&self, model: Option<&MatrixFactorization>) -> Vec<Option<u32>> {
        self.items
            .iter()
            .map(|i| model.and_then(|m| m.item_index(&i.item)).map(|r| r as u32))
            .collect()
    }
}

/// The user's choices about which topics may be used to personalise.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Permissions {
    /// Sensitive topics the user opted in for.
    pub consented: HashSet<String>,
    /// Topics the user removed from their profile: never inferred, never used.
    pub muted: HashSet<String>,
}

impl Permissions {
    /// Whether events on `item` may feed the profile and the model, and whether the item
    /// may fill a personalised slot. A sensitive item needs consent for **every** one of
    /// its topics (a sensitive item without topics is never usable); no item with a muted
    /// topic is usable.
    pub fn usable(&self, item: &CatalogueItem) -> bool {
        if item.topics.iter().any(|t| self.muted.contains(t)) {
            return false;
        }
        !item.sensitive
            || (!item.topics.is_empty() && item.topics.iter().all(|t| self.consented.contains(t)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn item(id: &str, topics: &[&str], sensitive: bool) -> CatalogueItem {
        CatalogueItem {
            item: id.into(),
            topics: topics.iter().map(|t| t.to_string()).collect(),
            sensitive,
            published: None,
            title: None,
            format: None,
            popularity: None,
        }
    }

    #[test]
    fn a_sensitive_item_needs_consent_for_every_topic_and_mutes_always_win() {
        let mut p = Permissions::default();
        let health = item("h", &["Health", "News"], true);
        assert!(!p.usable(&health));
        p.consented.insert("Health".into());
        assert!(!p.usable(&health));
        p.consented.insert("News".into());
        assert!(p.usable(&health));
        assert!(!p.usable(&item("x", &[], true)));
        p.muted.insert("News".into());
        assert!(!p.usable(&health));
        assert!(!p.usable(&item("n", &["News"], false)));
        assert!(p.usable(&item("c", &["Comedy"], false)));
    }

    #[test]
    fn a_later_entry_replaces_an_earlier_one_with_the_same_id() {
        let c = Catalogue::new(vec![item("a", &["X"], false), item("a", &["Y"], true)]);
        assert_eq!(c.len(), 1);
        assert!(c.get(0).sensitive);
        assert_eq!(c.topic_name(c.topic_ids(0)[0]), "Y");
    }
}
