use earnorm::bson::oid::ObjectId;
use earnorm::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Model)]
pub struct User {
    #[serde(rename = "_id", default, skip_serializing_if = "Option::is_none")]
    pub id: Option<ObjectId>,
    pub name: String,
}

pub trait Named {
    async fn display_name(&self) -> String;
}

// #[cached] adds items beside the method, which a trait impl cannot hold:
// cache an inherent method and call it from the trait method instead.
impl Named for User {
    #[cached(ttl = 60)]
    async fn display_name(&self) -> String {
        self.name.clone()
    }
}

fn main() {}
