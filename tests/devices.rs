//! Device state crosses at the switchover: named, versioned sections saved on the paused source, restored on the
//! destination before its vCPUs resume, and shown in the downtime's parts. A destination that cannot take them fails
//! the migration before the commit, and the source keeps its guest.

mod common;

use livemig::engine::guest::{
    DeviceSection, Devices, DirtyLog, Guest, GuestError, GuestMemory, SyntheticConfig, SyntheticGuest, Vcpus,
};
use livemig::transport::dest::{accept_migration, receive, DestOptions, ReceiveError};
use livemig::transport::source::{migrate, MigrateError, SourceOptions};
use livemig::transport::tls::{DestSecurity, SourceSecurity};
use std::net::{TcpListener, TcpStream};
use std::sync::Mutex;

/// A toy device model: what it saves, the version it reads, and what it was given back (and whether the vCPUs were
/// still paused then).
#[derive(Default)]
struct Model {
    sections: Vec<DeviceSection>,
    reads_version: u32,
    restored: Mutex<Option<(Vec<DeviceSection>, bool)>>,
    paused_probe: Option<std::sync::Arc<dyn Fn() -> bool + Send + Sync>>,
}

impl Devices for Model {
    fn save(&self) -> Result<Vec<DeviceSection>, GuestError> {
        Ok(self.sections.clone())
    }
    fn restore(&self, sections: &[DeviceSection]) -> Result<(), GuestError> {
        if let Some(s) = sections.iter().find(|s| s.version != self.reads_version) {
            return Err(GuestError::BadState(format!("{} version {} is not one this side reads", s.name, s.version)));
        }
        let paused = self.paused_probe.as_ref().is_some_and(|p| p());
        *self.restored.lock().unwrap() = Some((sections.to_vec(), paused));
        Ok(())
    }
}

/// A synthetic guest with devices (shared, so that a test may watch it from a device's restore).
struct WithDevices {
    guest: std::sync::Arc<SyntheticGuest>,
    model: Model,
}

impl Guest for WithDevices {
    fn memory(&self) -> &dyn GuestMemory {
        self.guest.memory()
    }
    fn dirty_log(&self) -> &dyn DirtyLog {
        self.guest.dirty_log()
    }
    fn vcpus(&self) -> &dyn Vcpus {
        Guest::vcpus(&*self.guest)
    }
    fn kind(&self) -> &'static str {
        "synthetic"
    }
    fn vcpu_count(&self) -> u32 {
        self.guest.vcpu_count()
    }
    fn devices(&self) -> Option<&dyn Devices> {
        Some(&self.model)
    }
}

fn sections() -> Vec<DeviceSection> {
    vec![
        DeviceSection { name: "serial".into(), version: 2, data: b"COM1 fifo".to_vec() },
        DeviceSection { name: "virtio-net0".into(), version: 2, data: (0..=255u8).cycle().take(200_000).collect() },
    ]
}

fn source() -> WithDevices {
    let cfg = SyntheticConfig { memory_bytes: 32 << 20, dirty_rate: 2000, ..Default::default() };
    let guest = std::sync::Arc::new(SyntheticGuest::new(&cfg).unwrap());
    WithDevices { guest, model: Model { sections: sections(), ..Model::default() } }
}

/// Migrates `src` to a destination whose guest `make` builds; returns both reports.
fn run<G: Guest + 'static>(
    src: &WithDevices,
    make: impl FnOnce(&livemig::transport::wire::Hello) -> Result<G, GuestError> + Send + 'static,
) -> (livemig::transport::source::SourceReport, Result<G, ReceiveError>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let dest = std::thread::spawn(move || {
        let opts = DestOptions::default();
        let (control, hello) = accept_migration(&listener, &opts, &DestSecurity::Insecure, &|_, _| {}).unwrap();
        receive(&[&listener], &control, hello, make, &opts, &DestSecurity::Insecure, &|_, _| {}).map(|(g, _)| g)
    });
    let r = migrate(
        src,
        TcpStream::connect(addr).unwrap(),
        &[],
        &SourceOptions::default(),
        &SourceSecurity::Insecure,
        &|_| {},
    );
    (r, dest.join().unwrap())
}

#[test]
fn device_sections_are_restored_before_the_destination_resumes_and_show_in_the_downtime() {
    let src = source();
    let (r, dest) = run(&src, |h| {
        let guest = std::sync::Arc::new(SyntheticGuest::destination(&h.layout, h.vcpus)?);
        Ok(WithDevices { guest, model: Model { reads_version: 2, ..Model::default() } })
    });
    r.result.unwrap();
    let dest = dest.unwrap();
    let (got, _) = dest.model.restored.lock().unwrap().clone().expect("the destination's devices were not restored");
    assert_eq!(got, sections());
    assert!(!Guest::vcpus(&dest).is_paused(), "the destination did not resume");
    let names: Vec<(String, u32, u64)> = r.device_sections.clone();
    assert_eq!(names, [("serial".into(), 2, 9), ("virtio-net0".into(), 2, 200_000)]);
    assert!(r.downtime_parts.device_state > std::time::Duration::ZERO, "{:?}", r.downtime_parts);
}

#[test]
fn the_destination_restores_devices_while_its_vcpus_are_still_paused() {
    let src = source();
    let (r, dest) = run(&src, |h| {
        let guest = std::sync::Arc::new(SyntheticGuest::destination(&h.layout, h.vcpus)?);
        let g = guest.clone();
        let probe: std::sync::Arc<dyn Fn() -> bool + Send + Sync> = std::sync::Arc::new(move || g.vcpus().is_paused());
        let model = Model { reads_version: 2, paused_probe: Some(probe), ..Model::default() };
        Ok(WithDevices { guest, model })
    });
    r.result.unwrap();
    let (_, paused) = dest.unwrap().model.restored.lock().unwrap().clone().unwrap();
    assert!(paused, "devices were restored after the vCPUs resumed");
}

#[test]
fn a_destination_that_cannot_take_the_devices_fails_before_commit_and_the_source_keeps_its_guest() {
    // One that takes no devices at all: the state would be dropped, so it refuses, naming them.
    let src = source();
    let (r, dest) = run(&src, |h| SyntheticGuest::destination(&h.layout, h.vcpus));
    let Err(e) = dest else { panic!("a destination without devices took device state") };
    let e = e.to_string();
    assert!(e.contains("serial, virtio-net0") && e.contains("takes none"), "{e}");
    assert!(matches!(r.result, Err(MigrateError::Link(_))), "{:?}", r.result);
    assert!(r.result.as_ref().unwrap_err().to_string().contains("takes none"), "{:?}", r.result);
    common::assert_running_unthrottled(&src.guest);
    // One whose device model reads another version.
    let src = source();
    let (r, dest) = run(&src, |h| {
        let guest = std::sync::Arc::new(SyntheticGuest::destination(&h.layout, h.vcpus)?);
        Ok(WithDevices { guest, model: Model { reads_version: 1, ..Model::default() } })
    });
    let Err(e) = dest else { panic!("a version the destination cannot read was taken") };
    let e = e.to_string();
    assert!(e.contains("serial version 2 is not one this side reads"), "{e}");
    assert!(r.result.is_err());
    common::assert_running_unthrottled(&src.guest);
}

#[test]
fn sections_the_wire_cannot_carry_fail_on_the_source_naming_the_device() {
    let mut src = source();
    src.model.sections.push(DeviceSection { name: "serial".into(), version: 1, data: vec![] });
    let (r, _) = run(&src, |h| SyntheticGuest::destination(&h.layout, h.vcpus));
    let e = r.result.unwrap_err().to_string();
    assert!(e.contains("device \"serial\" saved twice"), "{e}");
    common::assert_running_unthrottled(&src.guest);
}
