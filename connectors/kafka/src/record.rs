//! The parts of a Kafka record walcast adds around the encoder's key and
//! value: headers that let a consumer place a record in the WAL without
//! decoding its value (ordering, de-duplication, lag measurement).

use rdkafka::message::{Header, OwnedHeaders};
use walcast_sdk::{ChangeEvent, Lsn};

/// The commit LSN of the record's transaction, in Postgres's `X/X` form.
pub const LSN_HEADER: &str = "walcast.lsn";
/// The Postgres transaction id (xid) as decimal text; null when unknown
/// (snapshot reads).
pub const TXID_HEADER: &str = "walcast.txid";

/// On a dead-letter record: why the event was refused.
pub const ERROR_HEADER: &str = "walcast.error";
/// On a dead-letter record: the topic the event was meant for.
pub const TOPIC_HEADER: &str = "walcast.topic";

/// The headers of a dead-letter record: the usual ones plus the reason and
/// the intended topic, so an operator can replay it once the cause is fixed.
pub fn dead_letter_headers(event: &ChangeEvent, error: &str, topic: &str) -> OwnedHeaders {
    headers(event)
        .insert(Header {
            key: ERROR_HEADER,
            value: Some(error.as_bytes()),
        })
        .insert(Header {
            key: TOPIC_HEADER,
            value: Some(topic.as_bytes()),
        })
}

/// The headers every record of `event` carries (the event itself and the
/// tombstone that follows a delete).
pub fn headers(event: &ChangeEvent) -> OwnedHeaders {
    headers_for(event.source.commit_lsn, event.source.tx_id)
}

pub(crate) fn headers_for(commit_lsn: Lsn, tx_id: Option<u32>) -> OwnedHeaders {
    let lsn = commit_lsn.to_string();
    let txid = tx_id.map(|t| t.to_string());
    OwnedHeaders::new_with_capacity(2)
        .insert(Header {
            key: LSN_HEADER,
            value: Some(lsn.as_bytes()),
        })
        .insert(Header {
            key: TXID_HEADER,
            value: txid.as_ref().map(String::as_bytes),
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use rdkafka::message::Headers;

    #[test]
    fn lsn_in_postgres_form_and_null_txid() {
        let h = headers_for(Lsn(0x16_B374_D848), Some(571));
        assert_eq!(h.count(), 2);
        assert_eq!(h.get(0).key, LSN_HEADER);
        assert_eq!(h.get(0).value, Some(&b"16/B374D848"[..]));
        assert_eq!(h.get(1).value, Some(&b"571"[..]));
        let h = headers_for(Lsn(1), None);
        assert_eq!(h.get(1).key, TXID_HEADER);
        assert_eq!(h.get(1).value, None);
    }
}
