//! Compiles `proto/federation.proto` with protox (pure Rust, so no `protoc` is needed to
//! build) and generates the prost types, with serde attributes so the test vectors can show
//! every frame as JSON: bytes as lowercase hex, enums by name.

use prost_build::Config;
use prost_types::field_descriptor_proto::{Label, Type};

const PROTO: &str = "proto/federation.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed={PROTO}");
    let fds = protox::compile([PROTO], ["proto"])?;

    let mut config = Config::new();
    config.bytes(["."]);
    config.type_attribute(".", "#[derive(serde::Serialize, serde::Deserialize)]");
    config.message_attribute(".", "#[serde(default)]");
    config.type_attribute(
        ".relayfed.v1.Frame.kind",
        "#[serde(rename_all = \"snake_case\")]",
    );

    for file in &fds.file {
        let package = file.package();
        for message in &file.message_type {
            for field in &message.field {
                let path = format!(".{package}.{}.{}", message.name(), field.name());
                let repeated = field.label == Some(Label::Repeated as i32);
                match field.r#type() {
                    Type::Bytes => {
                        let with = if repeated {
                            "crate::json::hex_vec"
                        } else {
                            "crate::json::hex"
                        };
                        config.field_attribute(&path, format!("#[serde(with = \"{with}\")]"));
                    }
                    Type::Enum => {
                        let enum_name = field.type_name().rsplit('.').next().unwrap_or_default();
                        config.field_attribute(
                            &path,
                            format!("#[serde(with = \"crate::json::{}\")]", snake(enum_name)),
                        );
                    }
                    _ => {}
                }
            }
        }
    }
    config.compile_fds(fds)?;
    Ok(())
}

fn snake(name: &str) -> String {
    let mut out = String::new();
    for (i, c) in name.chars().enumerate() {
        if c.is_ascii_uppercase() {
            if i > 0 {
                out.push('_');
            }
            out.push(c.to_ascii_lowercase());
        } else {
            out.push(c);
        }
    }
    out
}
