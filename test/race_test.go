//go:build race

package test

// raceEnabled builds the binary under test with -race when the suite runs
// with -race, so data races in the daemon fail the suite too.
const raceEnabled = true
