fn main() {
    // The vendored protoc spares a system package (protobuf-compiler); PROTOC overrides it.
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path().expect("vendored protoc");
        std::env::set_var("PROTOC", protoc);
    }
    tonic_prost_build::compile_protos("proto/echo.proto").expect("compile echo.proto");
}
