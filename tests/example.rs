//! The embedding example runs, and the README shows it as it is.

#[path = "../examples/embed.rs"]
mod embed;

#[test]
fn embedding_example_runs() {
    embed::main().expect("the example migrates its guest");
}

#[test]
fn readme_shows_the_example_verbatim() {
    let readme = include_str!("../README.md");
    let example = include_str!("../examples/embed.rs");
    // Compare from the first `use`: the README introduces the example in its own words.
    let body = &example[example.find("use ").unwrap()..];
    assert!(readme.contains(body), "README.md's embedding example differs from examples/embed.rs");
}
