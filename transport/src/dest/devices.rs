//! Device state on the destination: the sections the source sends before the vCPU state, bounded in number and
//! bytes, and handed to the guest's devices once, when the vCPU state arrives.

use super::ReceiveError;
use crate::wire::{self, Kind, WireError};
use livemig_engine::guest::{DeviceSection, Guest, GuestError};

/// The device sections received so far, bounded in number and bytes, and whether they have been restored (with the
/// vCPU state, once).
#[derive(Default)]
pub(super) struct DeviceSections {
    sections: Vec<DeviceSection>,
    bytes: u64,
    pub(super) restored: bool,
}

impl DeviceSections {
    pub(super) fn add(&mut self, s: DeviceSection) -> Result<(), ReceiveError> {
        let bad = |why: String| ReceiveError::Wire(WireError::Malformed { kind: Kind::DeviceState, why });
        if self.sections.len() >= wire::MAX_DEVICE_SECTIONS {
            return Err(bad(format!("more than {} device sections", wire::MAX_DEVICE_SECTIONS)));
        }
        self.bytes += s.data.len() as u64;
        if self.bytes > wire::MAX_DEVICE_BYTES {
            return Err(bad(format!("device state over {} bytes in all", wire::MAX_DEVICE_BYTES)));
        }
        if self.sections.iter().any(|x| x.name == s.name) {
            return Err(bad(format!("device {:?} sent twice", s.name)));
        }
        self.sections.push(s);
        Ok(())
    }

    /// Hands the sections to the guest's devices, before its vCPUs get their state. Sections for a guest that
    /// takes none are an error: state would be dropped silently.
    pub(super) fn restore(&mut self, guest: &dyn Guest) -> Result<(), ReceiveError> {
        self.restored = true;
        match guest.devices() {
            Some(d) => Ok(d.restore(&self.sections)?),
            None if self.sections.is_empty() => Ok(()),
            None => {
                let names: Vec<&str> = self.sections.iter().map(|s| s.name.as_str()).collect();
                Err(GuestError::BadState(format!(
                    "the source sent device state ({}) and this destination's guest takes none",
                    names.join(", ")
                ))
                .into())
            }
        }
    }
}
