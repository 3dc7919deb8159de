package cli

import (
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"time"

	"github.com/etcd-proxy-proxy/etcd-proxy-proxy/crypt"
)

// The encryption commands: keygen writes a key file, encrypt and decrypt turn one value into what the proxy
// stores under a key and back (etcvault's transform), for scripts, migrations and checks by hand.

// keygen writes a new key file, mode 0600, never over an existing file.
func keygen(args []string, stdout, stderr io.Writer) int {
	fs := flag.NewFlagSet("etcd-proxy-proxy keygen", flag.ContinueOnError)
	fs.SetOutput(stderr)
	out := fs.String("out", "", "the key file to write (must not exist)")
	name := fs.String("name", "key-"+time.Now().UTC().Format("20060102-150405"),
		"the key's name, stored with every value it encrypts (A-Z a-z 0-9 . _ -)")
	if err := fs.Parse(args); err != nil {
		return usageStatus(err)
	}
	if *out == "" || fs.NArg() > 0 {
		fmt.Fprintln(stderr, "etcd-proxy-proxy keygen: usage: keygen --out FILE [--name NAME]")
		return exitUsage
	}
	data, err := crypt.GenerateKeyFile(*name)
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy keygen: %v\n", err)
		return exitUsage
	}
	f, err := os.OpenFile(*out, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy keygen: %v\n", err)
		return exitError
	}
	if _, err := f.Write(data); err != nil {
		_ = f.Close()
		_ = os.Remove(*out)
		fmt.Fprintf(stderr, "etcd-proxy-proxy keygen: %v\n", err)
		return exitError
	}
	if err := f.Close(); err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy keygen: %v\n", err)
		return exitError
	}
	fmt.Fprintf(stdout, "wrote key %s to %s\n", *name, *out)
	return exitOK
}

// loadKeys reads the keys the encryption commands are given, in the keyring's order: the key files, then with
// plaintext the identity, then etcvault's keychain (when etcvaultDir is set); every problem is reported.
func loadKeys(files []string, plaintext bool, etcvaultDir string) ([]*crypt.Key, []error) {
	var keys []*crypt.Key
	var errs []error
	for _, f := range files {
		k, err := crypt.LoadKeyFile(f)
		if err != nil {
			errs = append(errs, err)
			continue
		}
		keys = append(keys, k)
	}
	if plaintext {
		keys = append(keys, crypt.IdentityKey())
	}
	if etcvaultDir != "" {
		k, err := crypt.LoadEtcvaultKeychain(etcvaultDir)
		if err != nil {
			errs = append(errs, fmt.Errorf("--etcvault-keychain: %w", err))
		} else {
			keys = append(keys, k)
		}
	}
	return keys, errs
}

// transform is encrypt (decrypting false) and decrypt: one value, from the command line or else standard input,
// as it is stored under --key.
func transform(decrypting bool, args []string, stdin io.Reader, stdout, stderr io.Writer) int {
	cmd := "encrypt"
	if decrypting {
		cmd = "decrypt"
	}
	fs := flag.NewFlagSet("etcd-proxy-proxy "+cmd, flag.ContinueOnError)
	fs.SetOutput(stderr)
	var files []string
	fs.Func("key-file", "an encryption key's file (repeatable: the first encrypts, all decrypt)", func(s string) error {
		files = append(files, s)
		return nil
	})
	key := fs.String("key", "", "the etcd key the value is stored under (v3: the key; v2: the node's path): values are bound to it")
	plaintext := fs.Bool("read-plaintext", false, "decrypt: a value that is not encrypted is printed as it is, not refused")
	etcvault := fs.String("etcvault-keychain", "", "etcvault's keychain directory (NAME.pem): decrypt etcvault's values too, encrypt its ETCVAULT::plain: markers")
	if err := fs.Parse(args); err != nil {
		return usageStatus(err)
	}
	if len(files) == 0 || !isSet(fs, "key") || fs.NArg() > 1 {
		fmt.Fprintf(stderr, "etcd-proxy-proxy %s: usage: %s --key-file FILE... --key ETCD_KEY [VALUE] (VALUE defaults to standard input)\n", cmd, cmd)
		return exitUsage
	}
	keys, errs := loadKeys(files, *plaintext, *etcvault)
	ring, err := crypt.NewKeyring(keys...)
	if err != nil || errs != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy %s: %v\n", cmd, errors.Join(append(errs, err)...))
		return exitUsage
	}
	var value []byte
	if fs.NArg() == 1 {
		value = []byte(fs.Arg(0))
	} else if value, err = io.ReadAll(stdin); err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy %s: reading standard input: %v\n", cmd, err)
		return exitError
	}
	if !decrypting {
		out, err := ring.Encrypt([]byte(*key), value)
		if err != nil {
			fmt.Fprintf(stderr, "etcd-proxy-proxy encrypt: %v\n", err)
			return exitError
		}
		fmt.Fprintf(stdout, "%s\n", out)
		return exitOK
	}
	out, read, err := ring.Decrypt([]byte(*key), value)
	if err != nil {
		fmt.Fprintf(stderr, "etcd-proxy-proxy decrypt: %s: %v\n", *key, err)
		return exitError
	}
	if read.Stale {
		fmt.Fprintf(stderr, "etcd-proxy-proxy decrypt: %s: read with %s, not the first key: stale\n", *key, read.Key)
	}
	_, _ = stdout.Write(out) // exactly the value: no newline added
	return exitOK
}

// isSet reports whether the command line set the flag (an empty etcd key is a key).
func isSet(fs *flag.FlagSet, name string) bool {
	set := false
	fs.Visit(func(f *flag.Flag) { set = set || f.Name == name })
	return set
}

// usageStatus is the exit status of a command whose flags did not parse: 0 for --help.
func usageStatus(err error) int {
	if errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	return exitUsage
}
