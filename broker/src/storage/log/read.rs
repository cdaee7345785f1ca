//! Reads: by offset (checked batches, past damage) and by timestamp.

use super::*;

impl PartitionLog {
    /// Reads stored batches starting with the one that holds `offset`: up to `max_bytes`,
    /// but always at least one whole batch, and never at or past the high watermark (an
    /// offset in `[high watermark, log end]` reads as empty). Every batch returned passed
    /// its CRC check; a corrupt first batch is [`StorageError::Corrupt`], a corrupt later
    /// one ends the read before it.
    pub fn read(&self, offset: i64, max_bytes: usize) -> Result<Bytes, StorageError> {
        let _reading = self
            .shared
            .truncation
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let plan = {
            let view = lock(&self.shared.view);
            if offset < view.log_start || offset > view.log_end {
                return Err(view.out_of_range(offset));
            }
            if offset >= view.high_watermark {
                return Ok(Bytes::new());
            }
            let i = view.segment_for(offset);
            view.segments[i].read_plan(offset, view.segment_end(i))
        };
        let Some((position, first)) =
            plan.find(PastDamage::FailAt(offset), |h| h.last_offset() >= offset)?
        else {
            return Err(plan.corrupt(
                plan.limit,
                format!("offset {offset} is below the high watermark but not in the segment"),
            ));
        };
        let first_bytes = first.total_bytes() as u64;
        let read_bytes = (max_bytes as u64)
            .max(first_bytes)
            .min(plan.limit - position);
        assert!(
            read_bytes >= first_bytes,
            "the found batch lies within the limit"
        );
        let mut buffer = vec![0u8; read_bytes as usize];
        plan.log
            .read_at(&mut buffer, position)
            .map_err(io_error("read", &plan.path))?;
        let whole = checked_batches_len(&plan, &buffer, position, first.base_offset)?;
        assert!(whole >= first_bytes as usize);
        buffer.truncate(whole);
        Ok(Bytes::from(buffer))
    }

    /// The first offset (at or above the log start, below the high watermark) whose batch
    /// has `max_timestamp >= timestamp_ms`: Kafka's ListOffsets by time, at batch
    /// granularity. `None` if no such batch.
    pub fn find_offset_by_timestamp(&self, timestamp_ms: i64) -> Result<Option<i64>, StorageError> {
        let _reading = self
            .shared
            .truncation
            .read()
            .unwrap_or_else(|e| e.into_inner());
        let (plan, log_start) = {
            let view = lock(&self.shared.view);
            let first = view.segment_for(view.log_start);
            let candidate = (first..view.segments.len()).find(|&i| {
                let s = &view.segments[i];
                s.committed_size > 0 && s.max_timestamp() >= timestamp_ms
            });
            let Some(i) = candidate else { return Ok(None) };
            let segment = &view.segments[i];
            let start = segment.base_offset + i64::from(segment.index.time_floor(timestamp_ms));
            (
                segment.read_plan(start, view.segment_end(i)),
                view.log_start,
            )
        };
        let found = plan.find(PastDamage::Skip, |h| {
            h.max_timestamp >= timestamp_ms && h.last_offset() >= log_start
        })?;
        Ok(found.map(|(_, header)| header.base_offset.max(log_start)))
    }
}

/// Checks the batches read into `buffer` (starting at file `position`, first base offset
/// `first_offset`) and returns the length of the valid whole batches. Bytes cut off by
/// `max_bytes` end the result quietly; a bad first batch is an error; a bad later batch ends
/// the result (the next read starts there and reports it).
fn checked_batches_len(
    plan: &ReadPlan,
    buffer: &[u8],
    position: u64,
    first_offset: i64,
) -> Result<usize, StorageError> {
    let mut at = 0usize;
    let mut expected = first_offset;
    while buffer.len() - at >= BATCH_HEADER_BYTES {
        let rest = &buffer[at..];
        let batch_position = position + at as u64;
        let problem = match BatchHeader::parse(rest) {
            Err(e) => Some(e.to_string()),
            Ok(header) if header.total_bytes() > rest.len() => {
                if at == 0 {
                    Some("batch longer than its header said during the index scan".to_owned())
                } else {
                    break; // cut by max_bytes
                }
            }
            Ok(header) => match verify_crc(&rest[..header.total_bytes()]) {
                Err(e) => Some(e.to_string()),
                Ok(_) if header.base_offset != expected => Some(format!(
                    "batch base offset {} where {expected} was expected",
                    header.base_offset
                )),
                Ok(_) if header.next_offset() > plan.segment_end_offset => {
                    Some("batch ends past its segment".to_owned())
                }
                Ok(_) => {
                    expected = header.next_offset();
                    at += header.total_bytes();
                    None
                }
            },
        };
        if let Some(reason) = problem {
            if at == 0 {
                // The walk found this batch by its header; the next whole batch says where
                // the damage ends.
                let next = resync(
                    plan.log.as_ref(),
                    &plan.path,
                    batch_position + 1,
                    plan.limit,
                    first_offset,
                    plan.segment_end_offset,
                )?;
                let to = next.map_or(plan.segment_end_offset, |(_, h)| h.base_offset);
                tracing::error!(
                    segment = %plan.path.display(), position = batch_position, %reason,
                    from_offset = first_offset, to_offset = to,
                    "damaged batch: these offsets cannot be read"
                );
                return Err(plan.damaged(batch_position, reason, first_offset, to));
            }
            tracing::warn!(
                segment = %plan.path.display(), position = batch_position, %reason,
                "corrupt batch: the read ends before it"
            );
            break;
        }
    }
    Ok(at)
}
