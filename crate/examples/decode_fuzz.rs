//! Prints the setup a fuzz input for the `estimate` target builds: `cargo run --example decode_fuzz -- FILE`.
fn main() {
    let path = std::env::args().nth(1).expect("usage: decode_fuzz FILE");
    let data = std::fs::read(path).expect("readable file");
    println!("{:#?}", vramfit::fuzzing::setup_from_bytes(&data));
}
