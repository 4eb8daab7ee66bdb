fn main() -> std::process::ExitCode {
    lorafleet_cli::main()
}
