//! One end of a KV transfer channel, as its own process, for the two-process channel tests.
//!
//! - `receive PORT CHUNK_BYTES BATCHES BATCH [TYPE]`: receives and verifies every chunk, prints
//!   `ok N`.
//! - `send PORT CHUNK_BYTES BATCHES BATCH [TYPE]`: sends chunks of deterministic content, prints
//!   `sent N` or the error.
#![forbid(unsafe_code)]

use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};
use kv_integration_tests::fill_chunk;
use nixl_core::{ChannelConfig, ChannelType, Role, create_channel};
use pinned_alloc::PoolConfig;

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [mode, port, chunk, batches, batch, rest @ ..] = args.as_slice() else {
        bail!(
            "usage: kv_channel_peer send|receive PORT CHUNK_BYTES BATCHES BATCH [nixl|mock_memory]"
        );
    };
    let port: u16 = port.parse()?;
    let chunk: usize = chunk.parse()?;
    let batches: usize = batches.parse()?;
    let batch: usize = batch.parse()?;
    let channel_type = match rest.first().map(String::as_str) {
        None | Some("nixl") => ChannelType::Nixl,
        Some("mock_memory") => ChannelType::MockMemory,
        Some(other) => bail!("unknown channel type {other}"),
    };
    let role = match mode.as_str() {
        "send" => Role::Sender,
        "receive" => Role::Receiver,
        other => bail!("unknown mode {other}"),
    };
    let pool = PoolConfig::new(chunk, (2 * batch * chunk.next_multiple_of(4096)) as u64).build()?;
    let config = ChannelConfig::new(channel_type, role, "127.0.0.1", port)
        .with_timeout(Duration::from_secs(20));
    let channel = create_channel(config, std::sync::Arc::clone(&pool))?;
    let mut expected = vec![0u8; chunk];
    for b in 0..batches {
        match role {
            Role::Sender => {
                let mut pages = pool.allocate_batch(batch)?;
                for (i, page) in pages.iter_mut().enumerate() {
                    fill_chunk(b * batch + i, page.as_mut_slice());
                }
                let refs: Vec<_> = pages.iter().collect();
                channel
                    .send(&refs)
                    .with_context(|| format!("sending batch {b}"))?;
            }
            Role::Receiver => {
                let pages = channel
                    .receive()
                    .with_context(|| format!("receiving batch {b}"))?;
                ensure!(
                    pages.len() == batch,
                    "batch {b} holds {} chunks",
                    pages.len()
                );
                for (i, page) in pages.iter().enumerate() {
                    fill_chunk(b * batch + i, &mut expected);
                    ensure!(
                        page.as_slice() == &expected[..],
                        "chunk {} differs",
                        b * batch + i
                    );
                }
            }
        }
    }
    match role {
        Role::Sender => println!("sent {}", batches * batch),
        Role::Receiver => println!("ok {}", batches * batch),
    }
    Ok(())
}
