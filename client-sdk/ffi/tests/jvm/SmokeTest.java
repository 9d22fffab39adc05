// A JVM smoke test of libfedpref_ffi over the C ABI that the generated Kotlin binds, with
// the same JNA (Debian's libjna-java) and the same calling conventions: handles cloned per
// call, strings as UTF-8 RustBuffers, results and errors in UniFFI's big-endian
// serialisation. It also checks the contract version and every API checksum that the
// generated Kotlin source expects, so a stale fedpref_ffi.kt fails here.
//
//   java -cp /usr/share/java/jna.jar SmokeTest.java LIBRARY_DIR GENERATED.kt
//
// (No modern Kotlin compiler can be installed on the build machine, so the generated
// Kotlin itself is not compiled here.)

import com.sun.jna.Function;
import com.sun.jna.Library;
import com.sun.jna.Memory;
import com.sun.jna.Native;
import com.sun.jna.NativeLibrary;
import com.sun.jna.Pointer;
import com.sun.jna.Structure;
import java.nio.ByteBuffer;
import java.nio.ByteOrder;
import java.nio.charset.StandardCharsets;
import java.nio.file.Files;
import java.nio.file.Path;
import java.util.ArrayList;
import java.util.List;
import java.util.regex.Matcher;
import java.util.regex.Pattern;

public class SmokeTest {
    @Structure.FieldOrder({"capacity", "len", "data"})
    public static class RustBuffer extends Structure {
        public long capacity;
        public long len;
        public Pointer data;
        public static class ByValue extends RustBuffer implements Structure.ByValue {}
    }

    @Structure.FieldOrder({"len", "data"})
    public static class ForeignBytes extends Structure {
        public int len;
        public Pointer data;
        public static class ByValue extends ForeignBytes implements Structure.ByValue {}
    }

    @Structure.FieldOrder({"code", "errorBuf"})
    public static class RustCallStatus extends Structure {
        public byte code;
        public RustBuffer.ByValue errorBuf;
    }

    public interface Lib extends Library {
        int ffi_fedpref_ffi_uniffi_contract_version();
        RustBuffer.ByValue ffi_fedpref_ffi_rustbuffer_from_bytes(ForeignBytes.ByValue bytes, RustCallStatus status);
        void ffi_fedpref_ffi_rustbuffer_free(RustBuffer.ByValue buf, RustCallStatus status);
        long uniffi_fedpref_ffi_fn_constructor_fedprefdevice_open(RustBuffer.ByValue path, RustCallStatus status);
        long uniffi_fedpref_ffi_fn_clone_fedprefdevice(long handle, RustCallStatus status);
        void uniffi_fedpref_ffi_fn_free_fedprefdevice(long handle, RustCallStatus status);
        RustBuffer.ByValue uniffi_fedpref_ffi_fn_method_fedprefdevice_ingest_jsonl(
            long handle, RustBuffer.ByValue lines, byte skipInvalid, RustBuffer.ByValue now, RustCallStatus status);
        RustBuffer.ByValue uniffi_fedpref_ffi_fn_method_fedprefdevice_recommend(
            long handle, int k, RustBuffer.ByValue now, RustCallStatus status);
        RustBuffer.ByValue uniffi_fedpref_ffi_fn_method_fedprefdevice_budget(long handle, RustCallStatus status);
    }

    static Lib lib;
    static int passed = 0;

    static void check(boolean ok, String what) {
        if (!ok) {
            throw new AssertionError(what);
        }
        passed++;
        System.out.println("ok   " + what);
    }

    static RustBuffer.ByValue bytes(byte[] b) {
        Memory m = new Memory(Math.max(1, b.length));
        m.write(0, b, 0, b.length);
        ForeignBytes.ByValue fb = new ForeignBytes.ByValue();
        fb.len = b.length;
        fb.data = m;
        RustCallStatus s = new RustCallStatus();
        RustBuffer.ByValue rb = lib.ffi_fedpref_ffi_rustbuffer_from_bytes(fb, s);
        ok(s);
        return rb;
    }

    static RustBuffer.ByValue string(String v) {
        return bytes(v.getBytes(StandardCharsets.UTF_8));
    }

    /** `Option<SystemTime>::None`: the device's clock. */
    static RustBuffer.ByValue noTime() {
        return bytes(new byte[] {0});
    }

    static ByteBuffer read(RustBuffer.ByValue rb) {
        byte[] b = rb.len == 0 ? new byte[0] : rb.data.getByteArray(0, (int) rb.len);
        RustCallStatus s = new RustCallStatus();
        lib.ffi_fedpref_ffi_rustbuffer_free(rb, s);
        ok(s);
        return ByteBuffer.wrap(b).order(ByteOrder.BIG_ENDIAN);
    }

    static String readString(ByteBuffer b) {
        byte[] s = new byte[b.getInt()];
        b.get(s);
        return new String(s, StandardCharsets.UTF_8);
    }

    static void ok(RustCallStatus s) {
        if (s.code != 0) {
            ByteBuffer e = read(s.errorBuf);
            String detail = s.code == 1 ? "error variant " + e.getInt() + ": " + readString(e) : readString(e);
            throw new AssertionError("Rust call failed: " + detail);
        }
    }

    public static void main(String[] args) throws Exception {
        String libDir = args[0];
        String kotlin = Files.readString(Path.of(args[1]));
        System.setProperty("jna.library.path", libDir);
        lib = Native.load("fedpref_ffi", Lib.class);

        Matcher contract = Pattern.compile("val bindings_contract_version = (\\d+)").matcher(kotlin);
        check(contract.find() && Integer.parseInt(contract.group(1)) == lib.ffi_fedpref_ffi_uniffi_contract_version(),
            "the library's contract version is the generated Kotlin's");
        Matcher sums = Pattern.compile("lib\\.(uniffi_fedpref_ffi_checksum_\\w+)\\(\\) and 0xFFFF\\) != (\\d+)").matcher(kotlin);
        NativeLibrary nl = NativeLibrary.getInstance("fedpref_ffi");
        List<String> mismatched = new ArrayList<>();
        int sumCount = 0;
        while (sums.find()) {
            sumCount++;
            Function f = nl.getFunction(sums.group(1));
            int got = ((Short) f.invoke(Short.class, new Object[0])) & 0xFFFF;
            if (got != Integer.parseInt(sums.group(2))) {
                mismatched.add(sums.group(1));
            }
        }
        check(sumCount >= 15 && mismatched.isEmpty(),
            "all " + sumCount + " API checksums the generated Kotlin expects match the library " + mismatched);

        Path store = Files.createTempDirectory("fedpref-jvm").resolve("device.db");
        RustCallStatus s = new RustCallStatus();
        long device = lib.uniffi_fedpref_ffi_fn_constructor_fedprefdevice_open(string(store.toString()), s);
        ok(s);
        check(device != 0, "FedprefDevice.open returned a handle");

        StringBuilder lines = new StringBuilder();
        String[] topics = {"Comedy", "Drama", "Jazz"};
        for (int i = 0; i < 12; i++) {
            lines.append("{\"type\":\"item\",\"item\":\"i").append(i).append("\",\"topics\":[\"")
                .append(topics[i % 3]).append("\"]}\n");
        }
        lines.append("{\"type\":\"rating\",\"item\":\"i2\",\"value\":5,\"at\":\"2026-05-30T20:00:00Z\"}\n");
        lines.append("{\"type\":\"thumbs\",\"item\":\"i5\",\"value\":\"up\",\"at\":\"2026-05-30T20:05:00Z\"}\n");
        s = new RustCallStatus();
        ByteBuffer report = read(lib.uniffi_fedpref_ffi_fn_method_fedprefdevice_ingest_jsonl(
            lib.uniffi_fedpref_ffi_fn_clone_fedprefdevice(device, new RustCallStatus()),
            string(lines.toString()), (byte) 0, noTime(), s));
        ok(s);
        long items = report.getLong(), feedback = report.getLong();
        check(items == 12 && feedback == 2, "ingest stored 12 items and 2 feedback events");

        s = new RustCallStatus();
        ByteBuffer recs = read(lib.uniffi_fedpref_ffi_fn_method_fedprefdevice_recommend(
            lib.uniffi_fedpref_ffi_fn_clone_fedprefdevice(device, new RustCallStatus()), 4, noTime(), s));
        ok(s);
        int n = recs.getInt();
        boolean labelled = true;
        for (int i = 0; i < n; i++) {
            String item = readString(recs);
            double score = recs.getDouble();
            String label = readString(recs);
            int reason = recs.getInt(); // 1 personal, 2 diversity, 3 recency, 4 popular
            System.out.printf("     %s %.3f %s (reason %d)%n", item, score, label, reason);
            labelled &= item.startsWith("i") && !label.isEmpty() && reason == 4;
        }
        check(n == 4 && labelled, "recommend(4) gave 4 labelled, non-personalised items without a model");

        s = new RustCallStatus();
        lib.uniffi_fedpref_ffi_fn_method_fedprefdevice_ingest_jsonl(
            lib.uniffi_fedpref_ffi_fn_clone_fedprefdevice(device, new RustCallStatus()),
            string("{\"type\":\"rating\",\"item\":\"i1\",\"value\":9}\n"), (byte) 0, noTime(), s);
        ByteBuffer err = read(s.errorBuf);
        int variant = err.getInt();
        String message = readString(err);
        check(s.code == 1 && variant == 2 && message.startsWith("1 invalid line(s), nothing was stored; first: line 1"),
            "a bad line is FedprefException.InvalidLines with the SDK's message: " + message);

        s = new RustCallStatus();
        ByteBuffer budget = read(lib.uniffi_fedpref_ffi_fn_method_fedprefdevice_budget(
            lib.uniffi_fedpref_ffi_fn_clone_fedprefdevice(device, new RustCallStatus()), s));
        ok(s);
        double epsBudget = budget.getDouble(), delta = budget.getDouble(), spent = budget.getDouble();
        check(epsBudget == 10.0 && delta == 1e-6 && spent == 0.0, "a new store's budget is ε = 10 at δ = 1e-6, none spent");

        s = new RustCallStatus();
        lib.uniffi_fedpref_ffi_fn_free_fedprefdevice(device, s);
        ok(s);
        System.out.println("jvm: " + passed + " passed, 0 failed");
    }
}
