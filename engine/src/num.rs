//! The narrowing conversions the crates need, in one place: each is either lossless by a fact checked here at
//! compile time, or saturating by definition, so the code elsewhere never narrows with a bare `as` (the workspace
//! warns on `clippy::cast_possible_truncation`).

// Page indices and guest sizes are u64 and index host buffers: livemig builds only where usize holds any u64.
const _: () = assert!(usize::BITS >= u64::BITS, "livemig needs a 64-bit target");

/// A u64 index or length as usize: lossless on the 64-bit targets livemig builds for (checked above).
#[allow(clippy::cast_possible_truncation)]
pub const fn usize_from(v: u64) -> usize {
    v as usize
}

/// A measured rate, share or count as u64: rounds toward zero, takes NaN and negatives to 0 and what is too large to
/// `u64::MAX` (Rust's float-to-integer casts saturate).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn u64_saturating(v: f64) -> u64 {
    v as u64
}

/// As [`u64_saturating`], to u32.
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
pub fn u32_saturating(v: f64) -> u32 {
    v as u32
}

/// A length or count that a wire field of 32 bits carries. Every caller's value is bounded far below by a limit of
/// its own (frame sizes, page counts per batch, the decoder's caps); past `u32::MAX` a bug elsewhere would otherwise
/// write a wrapped length, so this panics instead of sending it.
pub fn u32_len(v: usize) -> u32 {
    u32::try_from(v).unwrap_or_else(|_| panic!("a length of {v} does not fit a 32-bit field"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn conversions_keep_or_saturate() {
        assert_eq!(usize_from(u64::MAX), usize::MAX);
        assert_eq!((u64_saturating(-1.0), u64_saturating(f64::NAN), u64_saturating(1e30)), (0, 0, u64::MAX));
        assert_eq!((u32_saturating(2.9), u32_saturating(1e12)), (2, u32::MAX));
        assert_eq!(u32_len(4096), 4096);
        assert!(std::panic::catch_unwind(|| u32_len(usize::MAX)).is_err());
    }
}
