use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    #[earnorm(pattern = "[a-z")]
    pub code: String,
    #[earnorm(pattern = "(?:a{1000}){1000}")]
    pub huge: String,
}

fn main() {}
