use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id")]
    pub id: ObjectId,
    #[earnorm(email, min_length = 3)]
    pub age: u32,
}

fn main() {}
