use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
pub struct User {
    #[earnorm(id)]
    pub id: ObjectId,
}

fn main() {}
