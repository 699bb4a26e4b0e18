//! The fuzz targets' input shaping, shared by the kernel side's targets
//! (`tests/fuzz.rs`) and the dispatcher's (`dispatcher/src/fuzz.rs`).

use std::vec::Vec;

/// A seed edited as `input` says: its first byte picks the seed, then each
/// three bytes are (operation, position, value) — replace, insert or
/// delete one byte — so random inputs explore the neighbourhood of
/// well-formed input instead of noise a parser refuses at its first byte.
pub fn mutate(seeds: &[&[u8]], input: &[u8]) -> Vec<u8> {
    let Some((&pick, edits)) = input.split_first() else { return seeds[0].to_vec() };
    let mut out = seeds[pick as usize % seeds.len()].to_vec();
    for e in edits.chunks_exact(3) {
        let at = e[1] as usize % (out.len() + 1);
        match e[0] % 3 {
            0 if at < out.len() => out[at] = e[2],
            1 => out.insert(at, e[2]),
            _ if at < out.len() => {
                out.remove(at);
            }
            _ => {}
        }
    }
    out
}
