//! The store limit: a raw `XADD` → `XREADGROUP` → `XACK` cycle in Rust
//! with the relay's payload and batch sizes, no relay in between.

use std::time::{Duration, Instant};

/// Messages per second through a full stream cycle with batches of `batch`.
pub async fn redis_cycle(url: &str, payload: &[u8], batch: usize, secs: f64) -> anyhow::Result<f64> {
    let client = redis::Client::open(url)?;
    let mut prod = client.get_multiplexed_async_connection().await?;
    let mut cons = client.get_multiplexed_async_connection().await?;
    let key = "bench:{yardstick}:stream";
    let _: redis::Value = redis::cmd("DEL").arg(key).query_async(&mut prod).await?;
    let _: redis::Value =
        redis::cmd("XGROUP").arg("CREATE").arg(key).arg("g").arg("$").arg("MKSTREAM").query_async(&mut prod).await?;
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let started = Instant::now();
    let payload = payload.to_vec();
    let producer = tokio::spawn(async move {
        while Instant::now() < deadline {
            let mut pipe = redis::pipe();
            for _ in 0..batch {
                pipe.cmd("XADD").arg(key).arg("*").arg("w").arg(&payload).ignore();
            }
            if pipe.query_async::<()>(&mut prod).await.is_err() {
                break;
            }
        }
    });
    let mut acked: u64 = 0;
    while Instant::now() < deadline {
        let v: redis::Value = redis::cmd("XREADGROUP")
            .arg("GROUP")
            .arg("g")
            .arg("c")
            .arg("COUNT")
            .arg(batch)
            .arg("BLOCK")
            .arg(100)
            .arg("STREAMS")
            .arg(key)
            .arg(">")
            .query_async(&mut cons)
            .await?;
        let ids = ids_of(&v);
        if ids.is_empty() {
            continue;
        }
        let n: u64 = redis::cmd("XACK").arg(key).arg("g").arg(&ids).query_async(&mut cons).await?;
        acked += n;
    }
    let _ = producer.await;
    let secs = started.elapsed().as_secs_f64();
    let _: redis::Value = redis::cmd("DEL").arg(key).query_async(&mut cons).await?;
    Ok(acked as f64 / secs)
}

fn ids_of(v: &redis::Value) -> Vec<String> {
    let mut out = Vec::new();
    if let redis::Value::Array(streams) = v {
        for s in streams {
            if let redis::Value::Array(kv) = s
                && let Some(redis::Value::Array(entries)) = kv.get(1)
            {
                for e in entries {
                    if let redis::Value::Array(parts) = e
                        && let Some(redis::Value::BulkString(id)) = parts.first()
                    {
                        out.push(String::from_utf8_lossy(id).into_owned());
                    }
                }
            }
        }
    }
    out
}
