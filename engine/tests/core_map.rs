//! The core map (`hot_core`): the fused CPU chain alone on its core, every other thread of
//! the process (and a node confined with it) on the others, intents still confirmed.

mod common;

use common::*;
use engine::config::{HotCore, Layout};
use engine::{EngineError, dev};
use pipeline::coremap::{parse_cpu_list, thread_cores};
use pipeline::{CoreBudget, CoreMapError};

/// Every thread of this process: (tid, name, allowed cores).
fn threads() -> Vec<(u32, String, Vec<usize>)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let Ok(tid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(name) = std::fs::read_to_string(e.path().join("comm")) else {
            continue;
        };
        if let Some(cores) = thread_cores(tid) {
            out.push((tid, name.trim().to_owned(), cores));
        }
    }
    out
}

/// Allowed cores of every thread of process `pid`.
fn process_cores(pid: u32) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let Ok(status) = std::fs::read_to_string(e.path().join("status")) else {
            continue;
        };
        let list = status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .unwrap()
            .trim();
        out.push(parse_cpu_list(list).unwrap());
    }
    out
}

#[test]
fn the_cpu_chain_owns_the_hot_core_and_every_other_thread_stays_off_it() {
    let budget = CoreBudget::detect();
    if budget.usable_cores() < 2 {
        // One core cannot be split: the engine says so by name instead of starting.
        let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default()).unwrap();
        let mut cfg = dev::dev_config(
            &anvil.ws_url(),
            "127.0.0.1:0".parse().unwrap(),
            SECRET.into(),
        );
        cfg.hot_core = Some(HotCore::Auto);
        match engine::Engine::start(cfg) {
            Err(EngineError::CoreMap(CoreMapError::TooFewCores { .. })) => return,
            Err(e) => panic!("expected TooFewCores, got {e}"),
            Ok(_) => panic!("a core map on one core must be refused"),
        }
    }
    let hot = *budget.core_ids().last().unwrap();
    let h = Harness::start_with(Layout::Fused, |c| c.hot_core = Some(HotCore::Auto));
    let map = h.engine().layout().core_map.clone().expect("a core map");
    assert_eq!(map.hot, hot, "auto takes the highest core of the mask");
    assert!(!map.rest.contains(&hot));
    assert_eq!(h.engine().layout().threads[0], "cpu");

    // The busy-spinning chain still does its work.
    let from = venues::DEV_ADDRESSES[0];
    transfers_confirm(&h, "dev0", from, "hot", 6);

    let all = threads();
    let cpu: Vec<_> = all.iter().filter(|(_, n, _)| n == "cpu").collect();
    assert_eq!(cpu.len(), 1, "one cpu thread: {all:?}");
    assert_eq!(
        cpu[0].2,
        vec![hot],
        "the cpu thread is pinned to the hot core"
    );
    for (tid, name, cores) in &all {
        if name != "cpu" {
            assert!(
                !cores.contains(&hot),
                "thread {tid} `{name}` may run on the hot core: {cores:?}"
            );
        }
    }

    // A node on the same machine is moved off the hot core the same way (dev mode does
    // this to its chain).
    pipeline::confine_threads(Some(h.anvil.pid()), &map.rest).unwrap();
    for cores in process_cores(h.anvil.pid()) {
        assert_eq!(cores, map.rest, "anvil's threads are on the other cores");
    }
    let layout = h.engine().layout().describe();
    assert!(
        layout.contains(&format!("hot core {hot} (busy-spin)")),
        "{layout}"
    );

    // After shutdown the process's threads may use the hot core again, so a process that
    // embeds one engine after another can give each its core map.
    drop(h);
    for (tid, name, cores) in threads() {
        assert!(
            cores.contains(&hot),
            "after shutdown, thread {tid} `{name}` still may not use core {hot}: {cores:?}"
        );
    }
    let again = Harness::start_with(Layout::Fused, |c| c.hot_core = Some(HotCore::Auto));
    assert_eq!(
        again.engine().layout().core_map.as_ref().map(|m| m.hot),
        Some(hot)
    );
}

#[test]
fn a_hot_core_needs_the_fused_layout_and_no_pin_list() {
    let anvil = venues::Anvil::spawn(&venues::AnvilConfig::default()).unwrap();
    let base = || {
        let mut c = dev::dev_config(
            &anvil.ws_url(),
            "127.0.0.1:0".parse().unwrap(),
            SECRET.into(),
        );
        c.hot_core = Some(HotCore::Core(0));
        c
    };
    let mut per_stage = base();
    per_stage.layout = Layout::PerStage;
    let e = per_stage.validate().unwrap_err().to_string();
    assert!(e.contains("hot_core: needs the fused layout"), "{e}");
    let mut pinned = base();
    pinned.pin_cores = vec![0];
    let e = pinned.validate().unwrap_err().to_string();
    assert!(
        e.contains("hot_core: cannot be combined with pin_cores"),
        "{e}"
    );
    // A core outside the mask is refused by number before anything starts.
    let mut outside = base();
    outside.hot_core = Some(HotCore::Core(4095));
    match engine::Engine::start(outside) {
        Err(EngineError::CoreMap(e)) => assert!(e.to_string().contains("4095"), "{e}"),
        Err(e) => panic!("expected a core-map error, got {e}"),
        Ok(_) => panic!("core 4095 is not in the mask"),
    }
}

#[test]
fn hot_core_parses_from_toml_as_auto_or_a_number() {
    #[derive(serde::Deserialize)]
    struct T {
        hot_core: HotCore,
    }
    let t: T = toml::from_str("hot_core = \"auto\"").unwrap();
    assert_eq!(t.hot_core, HotCore::Auto);
    let t: T = toml::from_str("hot_core = 3").unwrap();
    assert_eq!(t.hot_core, HotCore::Core(3));
    let e = toml::from_str::<T>("hot_core = \"fast\"")
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("hot_core"), "{e}");
}
