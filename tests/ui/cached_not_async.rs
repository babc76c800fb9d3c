use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
}

impl User {
    #[cached(ttl = 60)]
    pub fn name_len(&self) -> usize {
        self.name.len()
    }
}

fn main() {}
