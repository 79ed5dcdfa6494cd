//! Creates the topics services need, so nobody runs `kafka-topics.sh` by hand (SPEC A2).

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::types::RDKafkaErrorCode;

use super::{Error, Settings};

/// Create each of `logical` topics that does not exist yet.
pub async fn ensure(settings: &Settings, logical: &[String]) -> Result<(), Error> {
    if logical.is_empty() {
        return Ok(());
    }
    let admin: AdminClient<DefaultClientContext> = settings.client().create()?;
    let names: Vec<String> = logical.iter().map(|t| settings.topic(t)).collect();
    let new: Vec<NewTopic<'_>> = names
        .iter()
        .map(|name| {
            NewTopic::new(
                name,
                settings.partitions,
                TopicReplication::Fixed(settings.replication),
            )
        })
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(10)));
    for result in admin.create_topics(&new, &options).await? {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(Error::CreateTopic {
                    topic,
                    reason: code.to_string(),
                })
            }
        }
    }
    Ok(())
}
