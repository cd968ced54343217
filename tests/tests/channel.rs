//! The KV transfer channel: two processes on 127.0.0.1 through NIXL's UCX plugin, and the
//! in-process mock.

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kv_integration_tests::fill_chunk;
use kv_integration_tests::services::free_port;
use nixl_core::{ChannelConfig, ChannelType, Role, create_channel};

const SECRET: &str = "kv-channel-test-secret-5f2c9e1b";
use pinned_alloc::PoolConfig;

const PEER: &str = env!("CARGO_BIN_EXE_kv_channel_peer");

fn peer(mode: &str, port: u16, chunk: usize, batches: usize, batch: usize) -> Child {
    peer_with(&[mode], port, chunk, batches, batch, &[])
}

/// A peer process; `mode` is `send`, `receive` or `attack CASE`, `env` its extra environment.
fn peer_with(
    mode: &[&str],
    port: u16,
    chunk: usize,
    batches: usize,
    batch: usize,
    env: &[(&str, &str)],
) -> Child {
    Command::new(PEER)
        .args(mode)
        .args([
            port.to_string(),
            chunk.to_string(),
            batches.to_string(),
            batch.to_string(),
        ])
        .env("UCX_TLS", "tcp,self,sm")
        // Without InfiniBand, UCX's ib modules pull in libnl, whose destructor crashes at process
        // exit (see nixl-core's README): leave them out, as deployments without IB should.
        .env("UCX_MODULES", "^ib,rdmacm")
        .envs(env.iter().copied())
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

/// A receiver with the secret, listening on `host`, and an `attack CASE` peer that runs the
/// hostile case, then sends every batch honestly: the case is refused, the receiver gets every
/// chunk intact, and neither process prints the secret.
fn hostile_case(case: &str, host: &str) -> String {
    let (chunk, batches, batch) = (64 << 10, 4, 3);
    let port = free_port();
    let env = [("LMCACHE_PD_SECRET", SECRET), ("KV_CHANNEL_HOST", host)];
    let receiver = peer_with(&["receive"], port, chunk, batches, batch, &env);
    let attacker = peer_with(&["attack", case], port, chunk, batches, batch, &env);
    let (attacked, attacker_text) = finish(attacker);
    let (received, receiver_text) = finish(receiver);
    assert!(
        attacked,
        "attacker: {attacker_text}\nreceiver: {receiver_text}"
    );
    assert!(
        received,
        "receiver: {receiver_text}\nattacker: {attacker_text}"
    );
    assert!(
        receiver_text.contains(&format!("ok {}", batches * batch)),
        "{receiver_text}"
    );
    assert!(
        attacker_text.contains(&format!("refused {case}")),
        "{attacker_text}"
    );
    for text in [&attacker_text, &receiver_text] {
        assert!(!text.contains(SECRET), "the secret was printed: {text}");
    }
    attacker_text
}

#[test]
fn a_sender_with_the_wrong_secret_is_refused_and_the_right_one_served() {
    let text = hostile_case("wrong-secret", "0.0.0.0");
    assert!(text.contains("secret does not match"), "{text}");
}

#[test]
fn a_connection_sending_random_bytes_is_dropped_without_effect() {
    hostile_case("random-bytes", "127.0.0.1");
}

#[test]
fn a_connection_sending_a_truncated_frame_is_dropped_without_effect() {
    hostile_case("truncated-frame", "127.0.0.1");
}

#[test]
fn a_connection_announcing_a_4_gib_frame_is_dropped_without_effect() {
    hostile_case("oversized-frame", "127.0.0.1");
}

#[test]
fn a_replayed_handshake_from_a_captured_connection_fails() {
    hostile_case("replayed-handshake", "127.0.0.1");
}

/// Without a secret a receiver refuses to listen beyond loopback and says how to set one
/// (checked before NIXL is loaded).
#[test]
fn without_a_secret_the_receiver_listens_on_loopback_only() {
    let pool = PoolConfig::new(4096, 4 * 4096).build().unwrap();
    let config = ChannelConfig::new(ChannelType::Nixl, Role::Receiver, "0.0.0.0", free_port());
    let err = create_channel(config, pool).unwrap_err().to_string();
    assert!(
        err.contains("pd_secret") && err.contains("LMCACHE_PD_SECRET"),
        "{err}"
    );
}
