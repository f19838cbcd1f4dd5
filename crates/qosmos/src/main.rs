//! The `qosmos` command.

fn main() {
    println!("qosmos: under construction");
}
