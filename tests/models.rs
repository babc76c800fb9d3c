//! Models shared by the ORM tests (included with `#[path]`).

use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "users")]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    #[earnorm(required, min_length = 2, max_length = 40)]
    pub name: String,
    #[earnorm(email, unique)]
    pub email: String,
    #[earnorm(min = 0, max = 150)]
    pub age: Option<i32>,
    #[earnorm(pattern = "[a-z]{2}-[0-9]+", index)]
    #[serde(rename = "ref")]
    pub reference: Option<String>,
    #[serde(default)]
    pub profile: Profile,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub bio: String,
    pub tags: Vec<String>,
    pub address: Option<Address>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Address {
    pub city: String,
    pub zip: Option<String>,
}

impl User {
    pub fn new(name: &str, email: &str) -> Self {
        Self {
            id: None,
            name: name.into(),
            email: email.into(),
            age: Some(30),
            reference: None,
            profile: Profile::default(),
        }
    }
}

/// A model with an application-assigned string id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
pub struct Sku {
    #[serde(rename = "_id")]
    pub code: String,
    pub price_cents: i64,
}

/// A model with an integer id, optional.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Model)]
#[earnorm(collection = "counters")]
pub struct Counter {
    #[earnorm(id)]
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub number: Option<i64>,
    pub value: u32,
}
