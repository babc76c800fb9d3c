use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
}

impl User {
    #[cached(ttl = 60, key = "label")]
    pub async fn label(&self) -> String {
        self.name.clone()
    }

    // Would share `label`'s entries.
    #[cached(ttl = 60, key = "label")]
    pub async fn shout(&self) -> String {
        self.name.to_uppercase()
    }
}

fn main() {}
