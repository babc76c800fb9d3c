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
    #[cached(ttl = "300")]
    pub async fn a(&self) -> usize {
        self.name.len()
    }

    #[cached(ttl = 1.5)]
    pub async fn b(&self) -> usize {
        self.name.len()
    }
}

fn main() {}
