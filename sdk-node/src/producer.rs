//! The producer handle: packed batches in, delivery reports out.

use ketch_client::Producer;
use napi::bindgen_prelude::*;
use napi_derive::napi;

use crate::convert::unpack_records;
use crate::encode::encode;
use crate::error::{invalid_argument, to_napi};

/// Where each record of a batch went, index for index: numbers as typed arrays (no object
/// per record); `errors` holds `(index, encoded error)` for the records that failed.
#[napi(object)]
pub struct DeliveryReport {
    pub partitions: Uint32Array,
    /// Offsets (-1 with acks none); exact below 2^53.
    pub offsets: Float64Array,
    /// Timestamps as sent (ms since the Unix epoch).
    pub timestamps: Float64Array,
    pub error_indexes: Vec<u32>,
    /// Encoded like a rejection's message (`lib/errors.ts` decodes both).
    pub error_messages: Vec<String>,
}

/// A producer (`Producer` in the facade).
#[napi]
pub struct NativeProducer {
    producer: Producer,
}

impl NativeProducer {
    pub(crate) fn new(producer: Producer) -> NativeProducer {
        NativeProducer { producer }
    }
}

#[napi]
impl NativeProducer {
    /// Sends a packed batch of records to `topic` (layout in `convert.rs`) and resolves when
    /// every record is delivered or failed. The bytes are copied once, here, on the JS
    /// thread; waiting for buffer space and delivery happens on the runtime.
    #[napi(ts_return_type = "Promise<DeliveryReport>")]
    pub fn send_packed<'env>(
        &self,
        env: &'env Env,
        topic: String,
        numbers: Float64Array,
        data: Buffer,
    ) -> Result<PromiseRaw<'env, DeliveryReport>> {
        let records = unpack_records(&topic, &numbers, &data).map_err(invalid_argument)?;
        drop((numbers, data));
        let producer = self.producer.clone();
        env.spawn_future(async move {
            let count = records.len();
            let mut deliveries = Vec::with_capacity(count);
            let mut failed: Vec<(usize, ketch_client::Error)> = Vec::new();
            for (index, delivery) in producer.send_many(records).await.into_iter().enumerate() {
                match delivery {
                    Ok(delivery) => deliveries.push((index, delivery)),
                    Err(error) => failed.push((index, error)),
                }
            }
            let mut partitions = vec![0u32; count];
            let mut offsets = vec![-1.0f64; count];
            let mut timestamps = vec![0.0f64; count];
            // One after the other in this one task: the futures of a batch share its outcome,
            // which keeps one waker per task (a join of thousands of futures, each with its own
            // waker, would make every poll scan them all).
            for (index, delivery) in deliveries {
                match delivery.await {
                    Ok(metadata) => {
                        partitions[index] = metadata.partition;
                        offsets[index] = metadata.offset as f64;
                        timestamps[index] = metadata.timestamp as f64;
                    }
                    Err(error) => failed.push((index, error)),
                }
            }
            failed.sort_by_key(|(index, _)| *index);
            Ok(DeliveryReport {
                partitions: partitions.into(),
                offsets: offsets.into(),
                timestamps: timestamps.into(),
                error_indexes: failed.iter().map(|(index, _)| *index as u32).collect(),
                error_messages: failed.iter().map(|(_, error)| encode(error)).collect(),
            })
        })
    }

    /// Sends everything buffered now and resolves when it is all delivered or failed.
    #[napi]
    pub async fn flush(&self) -> Result<()> {
        self.producer.flush().await.map_err(to_napi)
    }

    /// Delivers what is buffered and stops; later sends fail with `closed`.
    #[napi]
    pub async fn close(&self) -> Result<()> {
        self.producer.close().await.map_err(to_napi)
    }

    /// Records queued or in flight.
    #[napi(getter)]
    pub fn pending_records(&self) -> u32 {
        self.producer.pending_records() as u32
    }
}
