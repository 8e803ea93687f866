// Drives PostgreSQL's JDBC driver (pgjdbc) through Strongroom and prints what it saw, one
// `name=value` line per check; tests/integration/test_jdbc.py asserts the lines.
//
// Why a separate program: pgjdbc is the driver most unlike libpq (its own SCRAM, named
// server-side statements after `prepareThreshold` uses, binary results for the types it
// knows, batches pipelined before one Sync, fetch-size portals, cancel on a new
// connection), so it is the best check that the proxy is invisible to a JVM app.
//
// Run with the JDK's source launcher:
//   java -cp postgresql.jar tests/jdbc/JdbcProbe.java JDBC_URL USER PASSWORD
import java.math.BigDecimal;
import java.sql.Connection;
import java.sql.Date;
import java.sql.DriverManager;
import java.sql.PreparedStatement;
import java.sql.ResultSet;
import java.sql.SQLException;
import java.sql.Statement;
import java.util.ArrayList;
import java.util.List;
import java.util.Properties;

public class JdbcProbe {
    static void out(String name, Object value) {
        System.out.println(name + "=" + value);
    }

    static String sqlState(ThrowingRunnable r) {
        try {
            r.run();
            return "none";
        } catch (SQLException e) {
            return e.getSQLState();
        }
    }

    interface ThrowingRunnable {
        void run() throws SQLException;
    }

    public static void main(String[] args) throws Exception {
        Properties props = new Properties();
        props.setProperty("user", args[1]);
        props.setProperty("password", args[2]);
        props.setProperty("sslmode", "disable");
        props.setProperty("prepareThreshold", "3"); // named server-side statements early
        props.setProperty("ApplicationName", "jdbc-probe");
        try (Connection c = DriverManager.getConnection(args[0], props)) {
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery(
                     "SELECT current_setting('application_name'), pg_backend_pid()")) {
                rs.next();
                out("application_name", rs.getString(1));
                out("backend_pid_positive", rs.getInt(2) > 0);
            }

            // Protected columns written with bound parameters (setString: varchar OID,
            // setBigDecimal: numeric, setDate: date), in a pipelined batch.
            try (PreparedStatement ps = c.prepareStatement(
                     "INSERT INTO j_cards (id, pan, balance, expiry, note) VALUES (?, ?, ?, ?, ?)")) {
                for (int i = 1; i <= 8; i++) {
                    ps.setInt(1, i);
                    ps.setString(2, String.format("41110000000000%02d", i));
                    ps.setBigDecimal(3, new BigDecimal(i + "00.0" + i));
                    ps.setDate(4, Date.valueOf("2031-0" + (i % 9 + 1) + "-15"));
                    ps.setString(5, i == 8 ? null : "note " + i);
                    ps.addBatch();
                }
                int total = 0;
                for (int n : ps.executeBatch()) total += n;
                out("batch_inserted", total);
            }
            try (PreparedStatement ps = c.prepareStatement(
                     "INSERT INTO j_cards (id, pan, balance, expiry, note) VALUES (?, ?, ?, ?, ?)")) {
                ps.setInt(1, 9);
                ps.setNull(2, java.sql.Types.VARCHAR);
                ps.setNull(3, java.sql.Types.NUMERIC);
                ps.setNull(4, java.sql.Types.DATE);
                ps.setString(5, "nulls");
                out("null_row_inserted", ps.executeUpdate());
            }

            // Equality lookups on the blind-indexed column, six times: from the third on
            // pgjdbc uses a named statement and binary results for int4, numeric, date.
            List<String> seen = new ArrayList<>();
            try (PreparedStatement ps = c.prepareStatement(
                     "SELECT id, pan, balance, expiry FROM j_cards WHERE pan = ?")) {
                for (int round = 0; round < 6; round++) {
                    int i = round % 3 + 2;
                    ps.setString(1, String.format("41110000000000%02d", i));
                    try (ResultSet rs = ps.executeQuery()) {
                        while (rs.next()) {
                            seen.add(rs.getInt(1) + "|" + rs.getString(2) + "|"
                                     + rs.getBigDecimal(3) + "|" + rs.getDate(4));
                        }
                    }
                }
            }
            out("lookups", String.join(",", seen));

            // Metadata of a result: the logical types, not bytea.
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("SELECT pan, balance, expiry FROM j_cards WHERE id = 1")) {
                java.sql.ResultSetMetaData md = rs.getMetaData();
                out("types", md.getColumnTypeName(1) + "," + md.getColumnTypeName(2) + ","
                    + md.getColumnTypeName(3));
                rs.next();
                out("row1", rs.getString(1) + "|" + rs.getBigDecimal(2) + "|" + rs.getDate(3));
            }
            try (Statement st = c.createStatement();
                 ResultSet rs = st.executeQuery("SELECT pan, balance, expiry FROM j_cards WHERE id = 9")) {
                rs.next();
                rs.getString(1);
                boolean n1 = rs.wasNull();
                rs.getBigDecimal(2);
                boolean n2 = rs.wasNull();
                rs.getDate(3);
                out("nulls", n1 + "," + n2 + "," + rs.wasNull());
            }

            // A fetch size in a transaction: a portal read two rows at a time.
            c.setAutoCommit(false);
            try (PreparedStatement ps = c.prepareStatement(
                     "SELECT id, pan FROM j_cards WHERE id <= 8 ORDER BY id")) {
                ps.setFetchSize(2);
                StringBuilder sb = new StringBuilder();
                try (ResultSet rs = ps.executeQuery()) {
                    while (rs.next()) sb.append(rs.getInt(1)).append(':').append(rs.getString(2).substring(14)).append(' ');
                }
                out("fetched", sb.toString().trim());
            }
            // Rollback really rolls back; an error aborts the transaction like PostgreSQL.
            try (Statement st = c.createStatement()) {
                st.executeUpdate("INSERT INTO j_cards (id, pan) VALUES (100, '4111000000000100')");
                c.rollback();
                out("after_rollback", sqlState(() -> st.executeQuery("SELECT 1")));
                try (ResultSet rs = st.executeQuery("SELECT count(*) FROM j_cards WHERE id = 100")) {
                    rs.next();
                    out("rolled_back_rows", rs.getInt(1));
                }
                out("syntax_error", sqlState(() -> st.executeQuery("SELEC 1")));
                out("in_failed_txn", sqlState(() -> st.executeQuery("SELECT 1")));
                c.rollback();
                out("duplicate_key", sqlState(() -> st.executeUpdate(
                    "INSERT INTO j_cards (id, pan) VALUES (1, '4111000000009999')")));
                c.rollback();
            }
            c.setAutoCommit(true);

            // Refusals reach the app as SQL errors with the proxy's SQLSTATE.
            try (Statement st = c.createStatement()) {
                out("range_refused", sqlState(() -> st.executeQuery(
                    "SELECT id FROM j_cards WHERE pan > '4'")));
                try (ResultSet rs = st.executeQuery("SELECT 42")) {
                    rs.next();
                    out("still_serving", rs.getInt(1));
                }
            }

            // Statement.cancel via a query timeout: a CancelRequest on a new connection.
            try (Statement st = c.createStatement()) {
                st.setQueryTimeout(1);
                long t0 = System.nanoTime();
                out("timeout", sqlState(() -> st.executeQuery("SELECT pg_sleep(30)")));
                out("cancelled_fast", (System.nanoTime() - t0) < 15_000_000_000L);
            }

            // RETURNING as generated keys, with a protected value decrypted in it.
            try (PreparedStatement ps = c.prepareStatement(
                     "INSERT INTO j_cards (id, pan) VALUES (?, ?)", new String[] {"id", "pan"})) {
                ps.setInt(1, 10);
                ps.setString(2, "4111000000000010");
                ps.executeUpdate();
                try (ResultSet rs = ps.getGeneratedKeys()) {
                    rs.next();
                    out("generated", rs.getInt(1) + "|" + rs.getString(2));
                }
            }
        }
        out("done", true);
    }
}
