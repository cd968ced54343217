//! The KV transfer channel: two processes on 127.0.0.1 through NIXL's UCX plugin, and the
//! in-process mock.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_integration_tests::fill_chunk;
use kv_integration_tests::services::free_port;
use nixl_core::{ChannelConfig, ChannelType, Role, create_channel};
use pinned_alloc::PoolConfig;

const PEER: &str = env!("CARGO_BIN_EXE_kv_channel_peer");

fn peer(mode: &str, port: u16, chunk: usize, batches: usize, batch: usize) -> Child {
    Command::new(PEER)
        .args([
            mode,
            &port.to_string(),
            &chunk.to_string(),
            &batches.to_string(),
            &batch.to_string(),
        ])
        .env("UCX_TLS", "tcp,self,sm")
        // Without InfiniBand, UCX's ib modules pull in libnl, whose destructor crashes at process
        // exit (see nixl-core's README): leave them out, as deployments without IB should.
        .env("UCX_MODULES", "^ib,rdmacm")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap()
}

fn finish(child: Child) -> (bool, String) {
    let output = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
    (output.status.success(), text)
}

fn two_processes(chunk: usize, batches: usize, batch: usize) {
    let port = free_port();
    let receiver = peer("receive", port, chunk, batches, batch);
    let sender = peer("send", port, chunk, batches, batch);
    let (sent, sender_text) = finish(sender);
    let (received, receiver_text) = finish(receiver);
    assert!(sent, "sender: {sender_text}");
    assert!(received, "receiver: {receiver_text}");
    assert!(
        receiver_text.contains(&format!("ok {}", batches * batch)),
        "{receiver_text}"
    );
}

#[test]
fn thousand_chunks_of_256_kib_between_two_processes() {
    two_processes(256 << 10, 20, 50);
}

#[test]
fn thirty_two_chunks_of_32_mib_between_two_processes() {
    two_processes(32 << 20, 8, 4);
}

#[test]
fn receiver_killed_mid_transfer_leaves_the_sender_with_an_error() {
    let port = free_port();
    let mut receiver = peer("receive", port, 32 << 20, 1000, 4);
    let sender = peer("send", port, 32 << 20, 1000, 4);
    std::thread::sleep(Duration::from_millis(1500));
    receiver.kill().unwrap();
    receiver.wait().unwrap();
    let started = Instant::now();
    let (ok, text) = finish(sender);
    assert!(!ok, "the sender must fail, not pretend: {text}");
    assert!(
        text.contains("channel peer") || text.contains("NIXL"),
        "{text}"
    );
    assert!(started.elapsed() < Duration::from_secs(60), "no hang");
}

#[test]
fn unreachable_receiver_is_a_clear_error() {
    let started = Instant::now();
    let (ok, text) = finish(peer("send", free_port(), 4096, 1, 1));
    assert!(!ok, "{text}");
    assert!(text.contains("unreachable"), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "bounded by the channel timeout"
    );
}

#[test]
fn mock_memory_channel_moves_batches_in_order() {
    let pool = PoolConfig::new(8192, 16 * 8192).build().unwrap();
    let port = free_port();
    let receiver = create_channel(
        ChannelConfig::new(ChannelType::MockMemory, Role::Receiver, "127.0.0.1", port),
        Arc::clone(&pool),
    )
    .unwrap();
    let sender = create_channel(
        ChannelConfig::new(ChannelType::MockMemory, Role::Sender, "127.0.0.1", port),
        Arc::clone(&pool),
    )
    .unwrap();
    for batch in 0..3 {
        let mut pages = pool.allocate_batch(2).unwrap();
        for (i, page) in pages.iter_mut().enumerate() {
            fill_chunk(batch * 2 + i, page.as_mut_slice());
        }
        sender.send(&[&pages[0], &pages[1]]).unwrap();
    }
    let mut expected = vec![0u8; 8192];
    for batch in 0..3 {
        let pages = receiver.receive().unwrap();
        for (i, page) in pages.iter().enumerate() {
            fill_chunk(batch * 2 + i, &mut expected);
            assert!(page.as_slice() == &expected[..]);
        }
    }
}
