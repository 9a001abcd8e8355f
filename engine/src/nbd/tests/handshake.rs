//! Option haggling: GO/INFO/EXPORT_NAME/LIST/ABORT, structured replies and
//! metadata contexts, and the handshake's own errors.

use super::*;

#[tokio::test]
async fn go_negotiates_size_flags_and_requested_infos() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    let want = [proto::INFO_NAME, proto::INFO_DESCRIPTION, proto::INFO_BLOCK_SIZE, 0x7777];
    let (infos, last) = c.info(proto::OPT_GO, EXPORT, &want).await;
    assert_eq!(last, proto::REP_ACK);
    let by_type = |t: u16| infos.iter().find(|i| proto::be_u16(i) == t).cloned();

    let export = by_type(proto::INFO_EXPORT).expect("EXPORT always sent");
    assert_eq!(proto::be_u64(&export[2..10]), SIZE);
    let flags = proto::be_u16(&export[10..12]);
    for f in [
        proto::FLAG_HAS_FLAGS,
        proto::FLAG_SEND_FLUSH,
        proto::FLAG_SEND_FUA,
        proto::FLAG_SEND_TRIM,
        proto::FLAG_SEND_WRITE_ZEROES,
        proto::FLAG_SEND_FAST_ZERO,
        proto::FLAG_CAN_MULTI_CONN,
    ] {
        assert_ne!(flags & f, 0, "flag {f:#x} advertised");
    }
    assert_eq!(flags & proto::FLAG_READ_ONLY, 0);
    assert_eq!(flags & proto::FLAG_SEND_DF, 0, "DF only with structured replies");
    assert_eq!(&by_type(proto::INFO_NAME).unwrap()[2..], EXPORT.as_bytes());
    assert_eq!(&by_type(proto::INFO_DESCRIPTION).unwrap()[2..], b"disk vm1/disk0");
    let bs = by_type(proto::INFO_BLOCK_SIZE).unwrap();
    assert_eq!((proto::be_u32(&bs[2..6]), proto::be_u32(&bs[6..10]), proto::be_u32(&bs[10..14])), (1, 4096, 32 << 20));
    assert_eq!(infos.len(), 4, "the unknown info type is ignored");

    let (error, data) = c.call(proto::CMD_READ, 0, 0, 512).await;
    assert_eq!((error, data), (0, vec![0u8; 512]));
    c.disconnect(task).await;
}

#[tokio::test]
async fn export_name_enters_transmission_with_and_without_zeroes() {
    for no_zeroes in [false, true] {
        let dev = mem();
        let h = Harness::new(dev.clone());
        let (mut c, task) = h.connect();
        let flags = proto::FLAG_C_FIXED_NEWSTYLE | if no_zeroes { proto::FLAG_C_NO_ZEROES } else { 0 };
        c.greet(flags).await;
        c.send_option(proto::OPT_EXPORT_NAME, EXPORT.as_bytes()).await;
        let mut reply = vec![0u8; if no_zeroes { 10 } else { 134 }];
        c.s.read_exact(&mut reply).await.unwrap();
        assert_eq!(proto::be_u64(&reply[0..8]), SIZE);
        assert_ne!(proto::be_u16(&reply[8..10]) & proto::FLAG_SEND_FLUSH, 0);
        assert!(reply[10..].iter().all(|&b| b == 0));
        assert_eq!(c.call_write(4096, b"hello", 0).await, 0);
        assert_eq!(&dev.contents()[4096..4101], b"hello");
        c.disconnect(task).await;
    }
}

#[tokio::test]
async fn export_name_of_unknown_export_closes() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_EXPORT_NAME, b"nope").await;
    c.expect_closed().await;
    let err = within(task).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
}

#[tokio::test]
async fn list_info_unknown_and_unsupported_options_keep_haggling() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;

    let (servers, last) = c.option_replies(proto::OPT_LIST, &[], proto::REP_SERVER).await;
    assert_eq!(last, proto::REP_ACK);
    let names: Vec<String> = servers
        .iter()
        .map(|d| String::from_utf8(d[4..4 + proto::be_u32(&d[0..4]) as usize].to_vec()).unwrap())
        .collect();
    assert_eq!(names, vec!["vm1/disk0".to_string(), "vm2/disk0".to_string()]);

    c.send_option(proto::OPT_LIST, b"junk").await;
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_INVALID);

    let (infos, last) = c.info(proto::OPT_INFO, "vm2/disk0", &[]).await;
    assert_eq!(last, proto::REP_ACK);
    assert_eq!(proto::be_u64(&infos[0][2..10]), 4096);

    let (infos, last) = c.info(proto::OPT_GO, "vm9/none", &[]).await;
    assert!(infos.is_empty());
    assert_eq!(last, proto::REP_ERR_UNKNOWN);

    // A truncated INFO request is invalid, not fatal.
    c.send_option(proto::OPT_INFO, &[0, 0, 0, 9, b'x']).await;
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_INVALID);

    for option in [proto::OPT_STARTTLS, proto::OPT_EXTENDED_HEADERS, proto::OPT_PEEK_EXPORT, 0xdead_beef] {
        c.send_option(option, &[1, 2, 3, 4, 5, 6, 7]).await;
        let r = c.option_reply().await;
        assert_eq!((r.option, r.reply_type), (option, proto::REP_ERR_UNSUP));
    }

    // Still haggling: GO works after all that.
    let (infos, last) = c.info(proto::OPT_GO, EXPORT, &[]).await;
    assert_eq!(last, proto::REP_ACK);
    assert_eq!(proto::be_u64(&infos[0][2..10]), SIZE);
    c.disconnect(task).await;
}

#[tokio::test]
async fn abort_is_acked_and_closes() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    c.send_option(proto::OPT_ABORT, &[]).await;
    let r = c.option_reply().await;
    assert_eq!((r.option, r.reply_type), (proto::OPT_ABORT, proto::REP_ACK));
    c.expect_closed().await;
    within(task).await.unwrap().unwrap();
}

#[tokio::test]
async fn oversized_option_gets_too_big_and_closes_without_allocating() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE).await;
    let header = proto::OptionHeader { magic: proto::IHAVEOPT, option: proto::OPT_GO, len: u32::MAX };
    c.s.write_all(&header.encode()).await.unwrap();
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_TOO_BIG);
    c.expect_closed().await;
    assert!(within(task).await.unwrap().is_err());
}

#[tokio::test]
async fn unknown_client_flags_close() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | 0x80).await;
    c.expect_closed().await;
    let err = within(task).await.unwrap().unwrap_err();
    assert!(err.to_string().contains("client flags"), "{err}");
}

#[tokio::test]
async fn structured_replies_are_acked_and_add_df_to_the_flags() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    c.send_option(proto::OPT_STRUCTURED_REPLY, b"x").await;
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_INVALID, "the option takes no data");
    let (infos, _) = c.info(proto::OPT_INFO, EXPORT, &[]).await;
    assert_eq!(proto::be_u16(&infos[0][10..12]) & proto::FLAG_SEND_DF, 0, "not negotiated yet");
    c.negotiate_structured().await;
    let (infos, last) = c.info(proto::OPT_GO, EXPORT, &[]).await;
    assert_eq!(last, proto::REP_ACK);
    assert_ne!(proto::be_u16(&infos[0][10..12]) & proto::FLAG_SEND_DF, 0, "DF with structured replies");
    // Every reply is structured now, a success too.
    let a = c.ask(proto::CMD_FLUSH, 0, 0, 0).await;
    assert_eq!((a.error, a.chunks), (0, vec![(proto::REPLY_TYPE_NONE, proto::REPLY_FLAG_DONE)]));
    c.disconnect(task).await;
}

#[tokio::test]
async fn meta_contexts_need_structured_replies_and_know_base_allocation() {
    let h = Harness::new(mem());
    let (mut c, task) = h.connect();
    c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
    for option in [proto::OPT_LIST_META_CONTEXT, proto::OPT_SET_META_CONTEXT] {
        let (contexts, last) = c.meta(option, EXPORT, &["base:allocation"]).await;
        assert_eq!((contexts.len(), last), (0, proto::REP_ERR_INVALID), "option {option} before STRUCTURED_REPLY");
    }
    c.negotiate_structured().await;

    let allocation = (0, proto::BASE_ALLOCATION.to_string());
    let list = proto::OPT_LIST_META_CONTEXT;
    assert_eq!(c.meta(list, EXPORT, &[]).await, (vec![allocation.clone()], proto::REP_ACK), "no query lists all");
    assert_eq!(c.meta(list, EXPORT, &["base:"]).await, (vec![allocation.clone()], proto::REP_ACK));
    assert_eq!(c.meta(list, EXPORT, &["base:allocation", "base:"]).await.0, vec![allocation], "listed once");
    assert_eq!(c.meta(list, EXPORT, &["qemu:dirty-bitmap:a", "base:nothing"]).await, (vec![], proto::REP_ACK));
    assert_eq!(c.meta(list, "vm9/none", &[]).await.1, proto::REP_ERR_UNKNOWN);
    c.send_option(list, &[0, 0, 0, 200]).await;
    assert_eq!(c.option_reply().await.reply_type, proto::REP_ERR_INVALID, "a name length past the data");

    let set = proto::OPT_SET_META_CONTEXT;
    assert_eq!(c.meta(set, EXPORT, &["base:"]).await, (vec![], proto::REP_ACK), "base: selects nothing");
    let (selected, last) = c.meta(set, EXPORT, &["x-other:thing", "base:allocation"]).await;
    assert_eq!(last, proto::REP_ACK);
    assert_eq!(selected.len(), 1);
    assert_eq!(selected[0].1, proto::BASE_ALLOCATION);
    assert_ne!(selected[0].0, 0, "a selected context has an id of its own");
    let (infos, last) = c.info(proto::OPT_GO, EXPORT, &[]).await;
    assert_eq!((infos.len(), last), (1, proto::REP_ACK));
    let a = c.ask(proto::CMD_BLOCK_STATUS, 0, 0, 4096).await;
    assert_eq!((a.error, a.context), (0, Some(selected[0].0)));
    c.disconnect(task).await;
}

#[tokio::test]
async fn block_status_needs_the_context_selected_for_the_export_in_use() {
    // Selected for another export, or replaced by a later SET that selects
    // nothing: BLOCK_STATUS is refused, the connection goes on.
    for (select_on, queries) in [("vm2/disk0", &["base:allocation"][..]), (EXPORT, &[][..])] {
        let h = Harness::new(mem());
        let (mut c, task) = h.connect();
        c.greet(proto::FLAG_C_FIXED_NEWSTYLE | proto::FLAG_C_NO_ZEROES).await;
        c.negotiate_structured().await;
        assert_eq!(c.meta(proto::OPT_SET_META_CONTEXT, EXPORT, &["base:allocation"]).await.1, proto::REP_ACK);
        assert_eq!(c.meta(proto::OPT_SET_META_CONTEXT, select_on, queries).await.1, proto::REP_ACK);
        assert_eq!(c.info(proto::OPT_GO, EXPORT, &[]).await.1, proto::REP_ACK);
        let a = c.ask(proto::CMD_BLOCK_STATUS, 0, 0, 4096).await;
        assert_eq!(a.error, proto::EINVAL, "{select_on} {queries:?}");
        assert!(a.message.contains("metadata context"), "{}", a.message);
        assert_eq!(c.call(proto::CMD_READ, 0, 0, 16).await, (0, vec![0; 16]));
        c.disconnect(task).await;
    }
}
