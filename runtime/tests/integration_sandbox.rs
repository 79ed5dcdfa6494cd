//! Loading components: real guests describe themselves; bad components are refused with the
//! reason; compiled components are cached on disk by content and engine.

mod common;

use saga_runtime::wasm::{Limits, LoadError, Sandbox};

fn sandbox(cache: Option<std::path::PathBuf>) -> Sandbox {
    Sandbox::new(Limits::default(), cache).unwrap()
}

#[test]
fn every_example_guest_describes_itself() {
    let s = sandbox(None);
    for (name, subscribed, publishes) in [
        ("order", "point", "order"),
        ("point", "exchange", "point"),
        ("exchange", "order", "exchange"),
        ("payment", "payment", "payment.success"),
        ("stock", "stock", "stock.success"),
    ] {
        let guest = s.load(&common::guest(name)).unwrap();
        let m = &guest.manifest;
        assert_eq!(m.name, name);
        assert_eq!(m.subscriptions[0].topic, subscribed);
        assert_eq!(m.publishes, [publishes]);
        assert_eq!(guest.digest.len(), 64);
    }
}

#[test]
fn garbage_bytes_are_refused_as_not_a_component() {
    let err = sandbox(None).load(b"definitely not wasm").err().unwrap();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");
    assert!(
        err.to_string()
            .contains("not a valid WebAssembly component"),
        "{err}"
    );
}

#[test]
fn a_core_module_is_refused() {
    // The smallest core module: magic + version 1. A component has a different layer.
    let err = sandbox(None).load(b"\0asm\x01\0\0\0").err().unwrap();
    assert!(matches!(err, LoadError::Compile(_)), "{err}");
}

#[test]
fn compiled_components_are_cached_by_content_and_engine() {
    let dir = tempfile::tempdir().unwrap();
    let s = sandbox(Some(dir.path().to_path_buf()));
    let wasm = common::guest("point");
    let first = s.load(&wasm).unwrap();
    let cached: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(cached.len(), 1, "{cached:?}");
    assert!(
        cached[0].starts_with(&first.digest) && cached[0].ends_with(".cwasm"),
        "{cached:?}"
    );
    // Loading again uses the cached file; a corrupt cache entry is recompiled, not fatal.
    assert_eq!(s.load(&wasm).unwrap().manifest.name, "point");
    std::fs::write(dir.path().join(&cached[0]), b"corrupt").unwrap();
    assert_eq!(s.load(&wasm).unwrap().manifest.name, "point");
}
