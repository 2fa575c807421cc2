//! Presence in real Chromium: two agents of the same account in two tabs see who else
//! has the chat open and who is typing, never themselves; closing a tab clears it.

use std::time::Duration;

use fantoccini::Locator;

use crate::harness::{Browser, Relay};

const WAIT: Duration = Duration::from_secs(20);

fn shows(id: &str, text: &str) -> String {
    format!("document.getElementById({id:?}).textContent === {text:?}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_agents_in_two_tabs_see_each_other_viewing_and_typing() {
    let relay = Relay::start().await;
    let (account, chat) = ("accPresence", "chatPresence");
    relay.post_message(account, chat, "Can someone help me with my order?").await;
    let page =
        |token: String| format!("{}/?api={}&token={token}&chat={chat}", relay.fanout_url(), relay.ingest_url);

    let browser = Browser::start().await;
    browser.client.goto(&page(relay.agent_token("ana", "Ana", &[account]))).await.expect("Ana's tab loads");
    browser.wait_until("Ana's tab is live", "document.body.dataset.hellos === '1'", WAIT).await;
    browser
        .wait_until(
            "Ana's tab shows the chat",
            "document.getElementById('messages').innerText.includes('help me with my order')",
            WAIT,
        )
        .await;
    let ana_tab = browser.client.window().await.unwrap();

    let ben_tab = browser.client.new_window(true).await.expect("a second tab").handle;
    browser.client.switch_to_window(ben_tab.clone()).await.unwrap();
    browser.client.goto(&page(relay.agent_token("ben", "Ben", &[account]))).await.expect("Ben's tab loads");
    browser.wait_until("Ben's tab is live", "document.body.dataset.hellos === '1'", WAIT).await;
    // Ben opened the chat after Ana: the answer to his `viewing` lists her.
    browser.wait_until("Ben sees Ana has the chat open", &shows("viewers", "Also here: Ana"), WAIT).await;

    browser.client.switch_to_window(ana_tab.clone()).await.unwrap();
    browser.wait_until("Ana sees Ben has the chat open", &shows("viewers", "Also here: Ben"), WAIT).await;
    assert_eq!(browser.eval("document.getElementById('typing').textContent").await, "", "nobody types yet");

    // Ben types (and does not send): Ana's tab says so, Ben's does not show himself.
    browser.client.switch_to_window(ben_tab.clone()).await.unwrap();
    let field = browser.client.find(Locator::Id("reply-text")).await.expect("the reply box");
    field.send_keys("Sure, what is the order num").await.expect("typed");
    assert_eq!(browser.eval("document.getElementById('typing').textContent").await, "", "not his own");
    browser.client.switch_to_window(ana_tab.clone()).await.unwrap();
    browser.wait_until("Ana sees Ben typing", &shows("typing", "Ben is typing…"), WAIT).await;
    browser.screenshot("presence-typing").await;
    // It goes by itself a few seconds after the last keystroke.
    browser.wait_until("the typing line clears", &shows("typing", ""), WAIT).await;

    // Ben closes his tab: Ana no longer sees him.
    browser.client.switch_to_window(ben_tab).await.unwrap();
    browser.client.close_window().await.expect("Ben's tab closes");
    browser.client.switch_to_window(ana_tab).await.unwrap();
    browser.wait_until("Ben is gone from Ana's tab", &shows("viewers", ""), WAIT).await;
    browser.close().await;
    relay.shutdown().await;
}
