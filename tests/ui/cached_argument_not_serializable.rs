use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
}

pub struct Opaque;

impl User {
    #[cached(ttl = 60)]
    pub async fn with(&self, opaque: Opaque) -> usize {
        let _ = opaque;
        self.name.len()
    }
}

fn main() {}
